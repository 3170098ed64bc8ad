"""/api/v1/tenant (the caller's own tenant), /api/v1/members, /api/v1/admin/tenants (platform)."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import Path, Query, Response
from psycopg.types.json import Jsonb

from iafactory.auth.dependencies import Admin, Owner, UserSession, Viewer
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import Problem, invalid, not_found
from iafactory.http.rendering import api_router
from iafactory.resources.pagination import MAX_LIMIT, Cursor, Page, decode, page_of
from iafactory.tenancy import members, service
from iafactory.tenancy.schemas import (
    AdminTenantUpdate,
    CreditGrant,
    CreditResult,
    MemberCreate,
    MemberOut,
    MemberUpdate,
    Plan,
    Region,
    Status,
    Tenant,
    TenantCreate,
    TenantFilters,
    TenantUpdate,
)

# A user id as PostgreSQL stores it (integer): a larger one cannot name a member, so validation
# refuses it (422 naming the field) instead of the database failing on an out-of-range parameter.
MemberId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The member's user id")]

router = api_router()
TENANT_COLUMNS = (
    "id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata, "
    "created_at, updated_at, trial_ends_at"
)


@router.get(
    "/tenant", response_model=Tenant, tags=["tenant"], operation_id="get_current_tenant", summary="The current tenant"
)
async def get_tenant(s: Viewer) -> Any:
    return await s.tx.fetchrow(f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = %s", (s.ctx.tenant_id,))


@router.patch(
    "/tenant",
    response_model=Tenant,
    tags=["tenant"],
    operation_id="update_current_tenant",
    summary="Edit the tenant's name, contact and settings (owner)",
)
async def update_tenant(body: TenantUpdate, s: Owner) -> Any:
    changes = body.model_dump(exclude_unset=True)
    if "name" in changes and changes["name"] is None:
        raise invalid("body.name", "cannot be null")
    if changes.get("settings") is not None:
        changes["settings"] = Jsonb(changes["settings"])
    if not changes:
        return await get_tenant(s)
    assignments = ", ".join(f"{column} = %s" for column in changes)
    return await s.tx.fetchrow(
        f"UPDATE tenants SET {assignments} WHERE id = %s RETURNING {TENANT_COLUMNS}",
        (*changes.values(), s.ctx.tenant_id),
    )


@router.get(
    "/members",
    response_model=list[MemberOut],
    tags=["members"],
    operation_id="list_members",
    summary="Members of the tenant",
)
async def list_members(s: Viewer) -> Any:
    return await members.list_members(s.tx, s.ctx.tenant_id)


@router.post(
    "/members",
    status_code=201,
    response_model=MemberOut,
    tags=["members"],
    operation_id="add_member",
    summary="Add a registered user by email (admin)",
    responses={
        404: {"description": "No account has this email: they register first (application/problem+json)"},
        409: {"description": "Already a member (application/problem+json)"},
    },
)
async def add_member(body: MemberCreate, s: Admin, idempotency: Idempotent) -> Any:
    return await idempotency.create(
        s, lambda last: members.add_member(s.tx, s.ctx.tenant_id, s.ctx.user_id, body.email, body.role)
    )


@router.patch(
    "/members/{user_id}",
    response_model=MemberOut,
    tags=["members"],
    operation_id="change_member_role",
    summary="Change a member's role (admin)",
)
async def change_member(user_id: MemberId, body: MemberUpdate, s: Admin) -> Any:
    return await members.change_role(s.tx, s.ctx.tenant_id, s.ctx.user_id, user_id, body.role)


@router.delete(
    "/members/{user_id}",
    status_code=204,
    response_class=Response,
    tags=["members"],
    operation_id="remove_member",
    summary="Remove a member (admin)",
)
async def remove_member(user_id: MemberId, s: Admin) -> Response:
    await members.remove_member(s.tx, s.ctx.tenant_id, s.ctx.user_id, user_id)
    return Response(status_code=204)


# --- platform administration -------------------------------------------------------------------


@router.get(
    "/admin/tenants",
    response_model=Page[Tenant],
    tags=["platform"],
    operation_id="admin_list_tenants",
    summary="All tenants (platform admin)",
)
async def admin_list_tenants(
    session: UserSession,
    region: Region | None = None,
    plan: Plan | None = None,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Cursor = None,
) -> Any:
    tx, _ = session
    after = decode(cursor, UUID) if cursor else None
    # Oldest first here (a stable registry order); the cursor still encodes (created_at, id).
    rows = await service.list_tenants(
        tx, TenantFilters(region=region, plan=plan, status=status), limit=limit + 1, after=after
    )
    items, next_cursor = page_of([r.model_dump() for r in rows], limit)
    return {"items": items, "next_cursor": next_cursor}


@router.post(
    "/admin/tenants",
    status_code=201,
    response_model=Tenant,
    tags=["platform"],
    operation_id="admin_create_tenant",
    summary="Create a tenant (platform admin)",
    responses={409: {"description": "The slug is taken (application/problem+json)"}},
)
async def admin_create_tenant(body: TenantCreate, session: UserSession) -> Any:
    tx, _ = session
    try:
        return await service.create_tenant(tx, body)
    except service.TenantError as err:
        raise Problem(409, "Conflict", str(err), type_="conflict") from err


@router.get(
    "/admin/tenants/{tenant_id}",
    response_model=Tenant,
    tags=["platform"],
    operation_id="admin_get_tenant",
    summary="One tenant (platform admin)",
)
async def admin_get_tenant(tenant_id: UUID, session: UserSession) -> Any:
    tx, _ = session
    try:
        return await service.get_tenant(tx, tenant_id=tenant_id)
    except service.TenantNotFound as err:
        raise not_found("tenant", tenant_id) from err


@router.patch(
    "/admin/tenants/{tenant_id}",
    response_model=Tenant,
    tags=["platform"],
    operation_id="admin_update_tenant",
    summary="Change a tenant's plan or status (platform admin)",
)
async def admin_update_tenant(tenant_id: UUID, body: AdminTenantUpdate, session: UserSession) -> Any:
    tx, _ = session
    try:
        tenant = await service.update_tenant(tx, tenant_id, plan=body.plan, status=body.status)
        if body.limits is not None:
            tenant = await service.set_limits(tx, tenant_id, body.limits.model_dump(exclude_none=True))
        return tenant
    except service.TenantNotFound as err:
        raise not_found("tenant", tenant_id) from err


@router.post(
    "/admin/tenants/{tenant_id}/credits",
    response_model=CreditResult,
    tags=["platform"],
    operation_id="admin_grant_credits",
    summary="Grant credits to a tenant (platform admin; idempotent)",
)
async def admin_grant_credits(tenant_id: UUID, body: CreditGrant, session: UserSession) -> Any:
    tx, _ = session
    return await service.grant_credits(tx, tenant_id, body.amount, body.reason, body.idempotency_key, body.kind)
