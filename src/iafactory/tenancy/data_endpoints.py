"""The tenant's data rights over HTTP: its export (GET /api/v1/tenant/export, admins), its
erasure requests (owners request and cancel, admins read), and the platform's side (list the
requests, confirm one). The SQL and the rules are in tenancy/data_rights.py; the console's
"Your data" page calls the same functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Query, Request, Response
from pydantic import BaseModel, Field

from iafactory.auth.dependencies import (
    Admin,
    Owner,
    TenantSession,
    UserPrincipal,
    client_ip,
    tenant_session,
    user_transaction,
)
from iafactory.http.problems import Problem, not_found
from iafactory.http.rendering import api_router
from iafactory.resources.types import Strict
from iafactory.tenancy import data_rights, members
from iafactory.tenancy import endpoints as tenancy_endpoints

router = api_router()

# The export writes its audit row in the transaction that reads the rows: not a read-only one.
ExportSession = Annotated[TenantSession, tenant_session("admin", read_only=False)]
ErasureStatus = Literal["pending", "confirmed", "cancelled"]
ARCHIVE_TYPE = "application/gzip"


class ErasureRequestIn(Strict):
    reason: str = Field(default="", max_length=2000, description="Why (kept with the request)")


class ErasureRequestOut(BaseModel):
    id: UUID
    status: ErasureStatus = Field(
        description="pending: waiting for a platform administrator; confirmed: an operator will erase the "
        "tenant's data; cancelled"
    )
    reason: str
    requested_by: int | None
    created_at: datetime
    decided_by: int | None
    decided_at: datetime | None


class PlatformErasureRequestOut(ErasureRequestOut):
    tenant_id: UUID
    slug: str
    tenant_name: str
    requested_by_email: str | None
    cell: str | None = Field(default=None, description="The region cell holding the tenant")


class ConfirmedOut(BaseModel):
    id: UUID
    status: ErasureStatus


def export_filename(slug: str) -> str:
    return f"{slug}-export-{datetime.now(UTC):%Y%m%d-%H%M%S}.tar.gz"


async def export_of(s: TenantSession, request: Request) -> tuple[bytes, str]:
    """The tenant's archive and its file name, through the caller's own transaction."""
    tenant = await tenancy_endpoints.get_tenant(s)
    people = await members.list_members(s.tx, s.ctx.tenant_id)
    body, _ = await data_rights.export_archive(
        s.tx,
        s.ctx.tenant_id,
        tenant,
        people,
        user_id=s.ctx.user_id,
        ip=client_ip(request),
        request_id=getattr(request.state, "request_id", None),
    )
    return body, export_filename(tenant["slug"])


@router.get(
    "/tenant/export",
    tags=["tenant"],
    operation_id="export_tenant_data",
    summary="Download the tenant's data (admin): a .tar.gz that `iafactory tenants import` restores",
    description="Every row of every tenant table as JSON lines, one file per table, with a manifest of row counts "
    "and SHA-256 checksums (the format of `iafactory tenants export`), read in one snapshot. Recorded in the audit "
    "log as `tenant.exported`.",
    response_class=Response,
    responses={
        200: {
            "description": "The archive (always as an attachment)",
            "content": {ARCHIVE_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def export_tenant_data(request: Request, s: ExportSession) -> Response:
    body, name = await export_of(s, request)
    return Response(
        content=body,
        media_type=ARCHIVE_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/tenant/erasure-requests",
    response_model=list[ErasureRequestOut],
    tags=["tenant"],
    operation_id="list_erasure_requests",
    summary="The tenant's erasure requests, newest first (admin)",
)
async def list_erasure_requests(s: Admin) -> Any:
    return await data_rights.erasure_requests(s.tx, s.ctx.tenant_id)


@router.post(
    "/tenant/erasure-requests",
    response_model=ErasureRequestOut,
    tags=["tenant"],
    operation_id="request_erasure",
    summary="Ask for the erasure of the tenant's data (owner); a platform administrator confirms it",
    description="Records a pending request, or answers the open one (pending or confirmed) if there is one: a "
    "tenant has at most one. Once a platform administrator confirms it, an operator erases the tenant's data "
    "(`iafactory tenants erase SLUG --confirm SLUG --confirmed-request`).",
)
async def request_erasure(body: ErasureRequestIn, request: Request, s: Owner) -> Any:
    row, _ = await data_rights.request_erasure(
        s.tx,
        s.ctx.tenant_id,
        user_id=s.ctx.user_id,
        reason=body.reason,
        ip=client_ip(request),
        request_id=getattr(request.state, "request_id", None),
    )
    return row


@router.post(
    "/tenant/erasure-requests/cancel",
    response_model=ErasureRequestOut,
    tags=["tenant"],
    operation_id="cancel_erasure_request",
    summary="Cancel the tenant's pending erasure request (owner)",
    responses={
        404: {"description": "No open erasure request (application/problem+json)"},
        409: {"description": "The request is confirmed already (application/problem+json)"},
    },
)
async def cancel_erasure_request(request: Request, s: Owner) -> Any:
    try:
        return await data_rights.cancel_erasure_request(
            s.tx,
            s.ctx.tenant_id,
            user_id=s.ctx.user_id,
            ip=client_ip(request),
            request_id=getattr(request.state, "request_id", None),
        )
    except data_rights.ErasureRequestError as err:
        if err.status == 404:
            raise Problem(404, "Not Found", str(err), type_="not-found") from err
        raise Problem(409, "Conflict", str(err), type_="conflict") from err


# --- the platform ----------------------------------------------------------------------------------


@router.get(
    "/admin/erasure-requests",
    response_model=list[PlatformErasureRequestOut],
    tags=["platform"],
    operation_id="admin_list_erasure_requests",
    summary="Erasure requests of every tenant, in every cell (platform admin), oldest first",
)
async def admin_list_erasure_requests(
    request: Request,
    who: UserPrincipal,
    status: Annotated[ErasureStatus | None, Query(description="Only this status (default: pending)")] = "pending",
) -> Any:
    out: list[dict[str, Any]] = []
    pools = request.app.state.cells
    for cell in pools.dbs:
        async with user_transaction(request, who, cell) as tx:
            for row in await data_rights.pending_erasure_requests(tx, status):
                out.append({**row, "cell": None if pools.single else cell})
    return sorted(out, key=lambda r: (r["created_at"], str(r["id"])))


@router.post(
    "/admin/tenants/{tenant_id}/erasure-request/confirm",
    response_model=ConfirmedOut,
    tags=["platform"],
    operation_id="admin_confirm_erasure_request",
    summary="Confirm a tenant's pending erasure request (platform admin); an operator then erases the data",
    description="Confirming again answers the confirmed request. The operator's command "
    "`iafactory tenants erase SLUG --confirm SLUG --confirmed-request` erases a tenant whose request is confirmed.",
    responses={404: {"description": "The tenant has no open erasure request (application/problem+json)"}},
)
async def admin_confirm_erasure_request(tenant_id: UUID, request: Request, who: UserPrincipal) -> Any:
    cell = await tenancy_endpoints._route(request, tenant_id)
    async with user_transaction(request, who, cell) as tx:
        row = await data_rights.confirm_erasure_request(tx, tenant_id, who.account_in(cell))
    if row is None:
        raise not_found("open erasure request of tenant", tenant_id)
    return row
