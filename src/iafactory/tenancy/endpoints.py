"""/api/v1/tenant (the caller's own tenant), /api/v1/members, /api/v1/admin/tenants (platform)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any
from uuid import UUID

from fastapi import Path, Query, Request, Response
from psycopg.types.json import Jsonb

from iafactory.auth.dependencies import (
    Admin,
    Owner,
    Principal,
    TenantSession,
    UserPrincipal,
    Viewer,
    accounts_of,
    cell_pools,
    client_ip,
    principal_cell,
    user_transaction,
)
from iafactory.cells import directory
from iafactory.cells.config import cell_for_region, cells
from iafactory.cells.routing import CellPools
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import Problem, invalid, not_found
from iafactory.http.rendering import api_router
from iafactory.resources.pagination import MAX_LIMIT, Cursor, Page, decode, page_of
from iafactory.tenancy import invitations, members, service
from iafactory.tenancy.schemas import (
    AdminTenantUpdate,
    CreditGrant,
    CreditResult,
    InvitationCreate,
    InvitationOut,
    MemberCreate,
    MemberOut,
    MemberUpdate,
    Plan,
    Region,
    SelfServiceTenantCreate,
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


def _token_cell(request: Request, s: TenantSession) -> str:
    return s.cell or cell_pools(request).home


@router.get(
    "/members/invitations",
    response_model=list[InvitationOut],
    tags=["members"],
    operation_id="list_invitations",
    summary="Invitations of the tenant: pending, accepted, revoked or expired (admin)",
)
async def list_invitations(s: Admin) -> Any:
    return await invitations.list_all(s.tx, s.ctx.tenant_id)


@router.post(
    "/members/invitations",
    status_code=201,
    response_model=InvitationOut,
    tags=["members"],
    operation_id="create_invitation",
    summary="Invite someone by email with a role (admin): they get a link valid 7 days",
    responses={409: {"description": "Already a member, or a pending invitation exists (application/problem+json)"}},
)
async def create_invitation(body: InvitationCreate, request: Request, s: Admin, idempotency: Idempotent) -> Any:
    settings = request.app.state.settings
    return await idempotency.create(
        s,
        lambda last: invitations.create(
            s.tx,
            settings,
            s.ctx.tenant_id,
            _token_cell(request, s),
            s.ctx.user_id,
            body.email,
            body.role,
            ip=client_ip(request),
            request_id=request.state.request_id,
        ),
    )


@router.post(
    "/members/invitations/{invitation_id}/resend",
    response_model=InvitationOut,
    tags=["members"],
    operation_id="resend_invitation",
    summary="Send a pending (or expired) invitation again with a new link; the old link stops working (admin)",
    responses={409: {"description": "Accepted or revoked already (application/problem+json)"}},
)
async def resend_invitation(invitation_id: UUID, request: Request, s: Admin) -> Any:
    return await invitations.resend(
        s.tx,
        request.app.state.settings,
        s.ctx.tenant_id,
        _token_cell(request, s),
        s.ctx.user_id,
        invitation_id,
        ip=client_ip(request),
        request_id=request.state.request_id,
    )


@router.delete(
    "/members/invitations/{invitation_id}",
    status_code=204,
    response_class=Response,
    tags=["members"],
    operation_id="revoke_invitation",
    summary="Revoke an invitation: its link stops working (admin)",
    responses={409: {"description": "Accepted already (application/problem+json)"}},
)
async def revoke_invitation(invitation_id: UUID, request: Request, s: Admin) -> Response:
    await invitations.revoke(
        s.tx,
        s.ctx.tenant_id,
        s.ctx.user_id,
        invitation_id,
        ip=client_ip(request),
        request_id=request.state.request_id,
    )
    return Response(status_code=204)


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


# --- self-service -------------------------------------------------------------------------------


@router.post(
    "/tenants",
    status_code=201,
    response_model=Tenant,
    tags=["tenant"],
    operation_id="create_own_tenant",
    summary="Create a tenant of your own (any signed-in user with a verified email): plan free, trial of 14 days, "
    "you are its owner",
    description="An account that registered itself confirms its email address first (the link of the "
    "verification email, POST /api/v1/auth/verify-email). The tenant lives in the region cell serving "
    "`region`; you need an account there (register with that region). Then call POST "
    "/api/v1/auth/select-tenant with its slug for a token acting for it. "
    "One account may own at most IAFACTORY_SELF_SERVICE_MAX_TRIAL_TENANTS tenants in trial (default 3). "
    "Off when the platform sets IAFACTORY_SELF_SERVICE_TENANTS=false.",
    responses={
        403: {
            "description": "Self-service is off, no account in the region's cell, your email address is not "
            "verified yet (type email-not-verified), or too many trial tenants (application/problem+json)"
        },
        409: {"description": "The slug is taken (application/problem+json)"},
    },
)
async def create_own_tenant(body: SelfServiceTenantCreate, request: Request, who: UserPrincipal) -> Any:
    settings = request.app.state.settings
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    if not settings.self_service_tenants:
        raise Problem(
            403,
            "Forbidden",
            "self-service tenant creation is turned off on this platform: ask the platform team to create your tenant",
            type_="self-service-disabled",
        )
    pools = _pools(request)
    cell = pools.home if pools.single else cell_for_region(cells(settings), body.region).name
    if cell not in accounts_of(request, who):
        raise Problem(
            403,
            "Forbidden",
            f"a tenant in region {body.region} lives in cell {cell!r}, where you have no account: register "
            f"(POST /api/v1/auth/register with region {body.region!r}), sign in with that account, then create it",
            type_="no-account-in-region",
        )
    tenant_id = uuid.uuid4()
    try:
        if pools.directory_db is None:
            return await _create_own(request, who, cell, body, tenant_id)
        route = directory.Route(tenant_id, body.slug, body.region, cell, "free", "trial")
        async with directory.reserved(pools.directory_db.anonymous, route):  # the slug, unique across cells
            return await _create_own(request, who, cell, body, tenant_id)
    except (service.TenantError, directory.DirectoryError) as err:
        raise Problem(409, "Conflict", str(err), type_="conflict") from err


async def _create_own(
    request: Request, who: Principal, cell: str, body: SelfServiceTenantCreate, tenant_id: UUID
) -> Tenant:
    settings = request.app.state.settings
    async with user_transaction(request, who, cell) as tx:
        return await service.create_own_tenant(
            tx,
            tenant_id,
            body.name,
            body.slug,
            body.region,
            trial_days=settings.self_service_trial_days,
            max_trials=settings.self_service_max_trial_tenants,
        )


# --- platform administration -------------------------------------------------------------------


def _pools(request: Request) -> CellPools:
    return request.app.state.cells


async def _route(request: Request, tenant_id: UUID) -> str:
    """The cell holding `tenant_id` (404 when the directory does not know it)."""
    route = await _pools(request).route(tenant_id, fresh=True)
    if route is None:
        raise not_found("tenant", tenant_id)
    return route.cell


async def _directory_update(request: Request, tenant: Tenant) -> None:
    pools = _pools(request)
    if pools.directory_db is not None:
        async with pools.directory_db.anonymous() as dtx:
            await directory.update_tenant(dtx, tenant.id, plan=tenant.plan, status=tenant.status)
        pools.forget(tenant.id)


@router.get(
    "/admin/tenants",
    response_model=Page[Tenant],
    tags=["platform"],
    operation_id="admin_list_tenants",
    summary="All tenants (platform admin); with region cells, from the directory",
)
async def admin_list_tenants(
    request: Request,
    who: UserPrincipal,
    region: Region | None = None,
    plan: Plan | None = None,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Cursor = None,
) -> Any:
    after = decode(cursor, UUID) if cursor else None
    filters = TenantFilters(region=region, plan=plan, status=status)
    pools = _pools(request)
    if pools.directory_db is None:
        async with user_transaction(request, who, pools.home) as tx:
            # Oldest first here (a stable registry order); the cursor still encodes (created_at, id).
            rows = await service.list_tenants(tx, filters, limit=limit + 1, after=after)
    else:
        # The directory gives the page; each cell then fills in its own tenants' details.
        async with user_transaction(request, who, principal_cell(request, who)) as tx:
            await tx.execute("SELECT app.assert_platform_operator()")
        async with pools.directory_db.anonymous(read_only=True) as dtx:
            page = await directory.routes(dtx, filters, limit=limit + 1, after=after)
        found: dict[UUID, Tenant] = {}
        for cell in dict.fromkeys(r["cell"] for r in page):
            async with user_transaction(request, who, cell) as tx:
                for r in page:
                    if r["cell"] == cell:
                        with contextlib.suppress(service.TenantNotFound):
                            found[r["tenant_id"]] = await service.get_tenant(tx, tenant_id=r["tenant_id"])
        rows = [found[r["tenant_id"]] for r in page if r["tenant_id"] in found]
    items, next_cursor = page_of([r.model_dump() for r in rows], limit)
    return {"items": items, "next_cursor": next_cursor}


@router.post(
    "/admin/tenants",
    status_code=201,
    response_model=Tenant,
    tags=["platform"],
    operation_id="admin_create_tenant",
    summary="Create a tenant (platform admin), in the cell serving its region",
    responses={409: {"description": "The slug is taken (application/problem+json)"}},
)
async def admin_create_tenant(body: TenantCreate, request: Request, who: UserPrincipal) -> Any:
    pools = _pools(request)
    cell = pools.home if pools.single else cell_for_region(cells(request.app.state.settings), body.region).name
    try:
        if pools.directory_db is None:
            async with user_transaction(request, who, cell) as tx:
                tenant = await service.create_tenant(tx, body)
                await _invite_admin(request, who, tx, cell, tenant)
                return tenant
        return await _create_in_cell(request, who, pools, cell, body)
    except (service.TenantError, directory.DirectoryError) as err:
        raise Problem(409, "Conflict", str(err), type_="conflict") from err


async def _invite_admin(request: Request, who: Principal, tx: Any, cell: str, tenant: Tenant) -> None:
    """A tenant created with an admin_email: that person gets an owner invitation, in the same
    transaction as the tenant (in the tenant's cell)."""
    if tenant.admin_email:
        await invitations.create_by_platform(
            tx,
            request.app.state.settings,
            tenant.id,
            cell,
            tenant.admin_email,
            "owner",
            actor=who.account_in(cell),
            ip=client_ip(request),
            request_id=request.state.request_id,
        )


async def _create_in_cell(request: Request, who: Principal, pools: CellPools, cell: str, body: TenantCreate) -> Tenant:
    """Directory first (the slug is unique across cells there), then the cell; a refusal by the
    cell takes the directory row back."""
    assert pools.directory_db is not None
    async with user_transaction(request, who, cell) as tx:
        await tx.execute("SELECT app.assert_platform_operator()")  # refuse before touching the directory
    tenant_id = uuid.uuid4()
    route = directory.Route(tenant_id, body.slug, body.region, cell, body.plan, body.status)
    async with directory.reserved(pools.directory_db.anonymous, route), user_transaction(request, who, cell) as tx:
        tenant = await service.create_tenant(tx, body, tenant_id=tenant_id)
        await _invite_admin(request, who, tx, cell, tenant)
    return tenant


@router.get(
    "/admin/tenants/{tenant_id}",
    response_model=Tenant,
    tags=["platform"],
    operation_id="admin_get_tenant",
    summary="One tenant (platform admin)",
)
async def admin_get_tenant(tenant_id: UUID, request: Request, who: UserPrincipal) -> Any:
    async with user_transaction(request, who, await _route(request, tenant_id)) as tx:
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
async def admin_update_tenant(tenant_id: UUID, body: AdminTenantUpdate, request: Request, who: UserPrincipal) -> Any:
    async with user_transaction(request, who, await _route(request, tenant_id)) as tx:
        try:
            tenant = await service.update_tenant(tx, tenant_id, plan=body.plan, status=body.status)
            if body.limits is not None:
                tenant = await service.set_limits(tx, tenant_id, body.limits.model_dump(exclude_none=True))
        except service.TenantNotFound as err:
            raise not_found("tenant", tenant_id) from err
    await _directory_update(request, tenant)
    return tenant


@router.post(
    "/admin/tenants/{tenant_id}/credits",
    response_model=CreditResult,
    tags=["platform"],
    operation_id="admin_grant_credits",
    summary="Grant credits to a tenant (platform admin; idempotent)",
)
async def admin_grant_credits(tenant_id: UUID, body: CreditGrant, request: Request, who: UserPrincipal) -> Any:
    async with user_transaction(request, who, await _route(request, tenant_id)) as tx:
        return await service.grant_credits(tx, tenant_id, body.amount, body.reason, body.idempotency_key, body.kind)
