"""/api/v1/auth/*, /api/v1/me and /api/v1/api-keys."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import Request, Response

from iafactory.admission import ANONYMOUS
from iafactory.audit import service as audit
from iafactory.auth import api_keys, passwords, service, tokens
from iafactory.auth.dependencies import (
    Admin,
    BearerCredential,
    CurrentPrincipal,
    Principal,
    UserPrincipal,
    Viewer,
    accounts_of,
    client_ip,
    principal_cell,
    tenant_context,
    unauthorized,
)
from iafactory.auth.schemas import (
    AcceptInvitationIn,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginIn,
    Membership,
    MeOut,
    MyTenant,
    RegisterIn,
    SelectTenantIn,
    TokenOut,
    UserOut,
)
from iafactory.cells import directory
from iafactory.config import Settings
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import Problem, not_found
from iafactory.http.rendering import api_router
from iafactory.tenancy import invitations

router = api_router()  # tags per route: an operation listed under two tags shows twice in /docs


def _settings(request: Request) -> Settings:
    return request.app.state.settings


@router.post(
    "/auth/register",
    status_code=201,
    response_model=UserOut,
    tags=["auth"],
    operation_id="register",
    summary="Create an account",
    responses={
        422: {
            "description": "Invalid body; also an email on a reserved domain (.test, .invalid ...) or mixing "
            "scripts (a Cyrillic letter among Latin ones) (application/problem+json)"
        }
    },
)
async def register(body: RegisterIn, request: Request) -> Any:
    # No transaction from a dependency: the password is hashed before one begins.
    return await service.register(request.app.state.cells, _settings(request), request.app.state.load.hashing, body)


@router.post(
    "/auth/login",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="login",
    summary="Sign in: a token, and the list of your tenants (selected if there is only one)",
)
async def login(body: LoginIn, request: Request) -> Any:
    settings = _settings(request)
    pools = request.app.state.cells
    signed_in = await service.sign_in(
        pools,
        settings,
        request.app.state.load.hashing,
        body,
        ip=client_ip(request),
        request_id=request.state.request_id,
    )
    token, ttl = service.token_for(settings, pools, signed_in.accounts, signed_in.selected, signed_in.platform_admin)
    request.state.user_id = next(iter(signed_in.accounts.values()))
    return TokenOut(access_token=token, expires_in=ttl, tenant=signed_in.selected, tenants=signed_in.tenants)


@router.post(
    "/auth/select-tenant",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="select_tenant",
    summary="A new token acting for one of your tenants",
)
async def select_tenant(body: SelectTenantIn, request: Request, who: UserPrincipal) -> Any:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    pools = request.app.state.cells
    accounts = accounts_of(request, who)
    tenants = await service.all_memberships(pools, accounts)
    chosen = service.choose(tenants, body.tenant)
    cell = chosen.cell or principal_cell(request, who)
    token, ttl = service.token_for(_settings(request), pools, accounts, chosen, who.platform_admin)
    async with pools.db(cell).anonymous(user_id=accounts[cell], client_ip=client_ip(request)) as tx:
        await audit.record(
            tx,
            chosen.id,
            "auth.tenant_selected",
            user_id=accounts[cell],
            details={"role": chosen.role},
            ip=client_ip(request),
            request_id=request.state.request_id,
        )
    return TokenOut(access_token=token, expires_in=ttl, tenant=chosen, tenants=tenants)


@router.post(
    "/auth/accept-invitation",
    response_model=TokenOut,
    tags=["auth"],
    operation_id="accept_invitation",
    # The bearer token is optional (a new person has none): OpenAPI's empty requirement says so.
    openapi_extra={"security": [{}]},
    summary="Accept an invitation: join its tenant, as your account (signed in) or as a new one (name, password)",
    responses={
        403: {
            "description": "The invitation is for another email, or the tenant is not open (application/problem+json)"
        },
        404: {"description": "No such invitation (application/problem+json)"},
        409: {"description": "Used already, or the email has an account: sign in first (application/problem+json)"},
        410: {"description": "Revoked or expired (application/problem+json)"},
    },
)
async def accept_invitation(body: AcceptInvitationIn, request: Request, bearer: BearerCredential) -> Any:
    """The token names the tenant (and its cell): no tenant credential is needed. With `password`, a
    new account of the invited email is created in the tenant's cell; without, the bearer token of
    an existing account of that email joins."""
    settings = _settings(request)
    pools = request.app.state.cells
    who: Principal | None = None
    if body.password is None:
        if bearer is None:
            raise Problem(
                401,
                "Unauthorized",
                "sign in and send your token (Authorization: Bearer), or choose a name and a password",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if api_keys.looks_like_key(bearer.credentials):
            raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
        try:
            claims = tokens.verify(settings, bearer.credentials)
        except tokens.InvalidToken as err:
            raise unauthorized(str(err)) from err
        who = Principal(
            claims.user_id,
            claims.tenant_id,
            claims.role,
            platform_admin=claims.platform_admin,
            cell=claims.cell,
            accounts=claims.accounts,
        )
    cell = invitations.token_cell(body.token)
    if cell is None or cell not in pools.dbs:
        raise invitations.refused("unknown")
    user_id = None
    if who is not None:
        user_id = who.account_in(cell) if who.cell is not None or cell == principal_cell(request, who) else None
        if user_id is None:
            raise Problem(
                403,
                "Forbidden",
                "your account is not in the region of this tenant: accept with a name and a password instead",
                type_="invitation-other-cell",
            )
    async with pools.db(cell).anonymous(read_only=True) as tx:
        found = await invitations.find(tx, settings, body.token)
    if found is None:
        raise invitations.refused("unknown")
    hashed = None
    if body.password is not None:
        request.app.state.load.hashing.gate.check_room(ANONYMOUS)
        hashed = await passwords.hash_password(settings, body.password, request.app.state.load.hashing)
    ip, request_id = client_ip(request), request.state.request_id
    if hashed is not None and pools.directory_db is not None:
        # Directory first (as for registration): sign-in must find the new account's cell.
        async with pools.directory_db.anonymous() as dtx:
            await directory.record_login(dtx, settings, found["email"], cell)
    async with pools.db(cell).anonymous(user_id=user_id, client_ip=ip, request_id=request_id) as tx:
        row = await invitations.accept(
            tx, settings, found, body.token, user_id, body.name, hashed, ip=ip, request_id=request_id
        )
    accounts = accounts_of(request, who) if who is not None else {cell: row["user_id"]}
    label = None if pools.single else cell
    joined = Membership(
        id=row["tenant_id"], slug=row["slug"], name=row["name"], role=row["role"], status=row["status"], cell=label
    )
    token, ttl = service.token_for(settings, pools, accounts, joined, who.platform_admin if who else False)
    request.state.user_id = row["user_id"]
    tenants = await service.all_memberships(pools, accounts)
    return TokenOut(access_token=token, expires_in=ttl, tenant=joined, tenants=tenants)


@router.get(
    "/me", response_model=MeOut, tags=["auth"], operation_id="get_me", summary="Who am I: user, current tenant and role"
)
async def me(who: CurrentPrincipal, request: Request) -> Any:
    return await _whoami(request, who)


async def _whoami(request: Request, who: Principal) -> MeOut:
    if who.tenant_id is not None:
        await tenant_context(request, who)  # the directory must agree with the credential's cell
    return await service.whoami(request.app.state.cells, principal_cell(request, who), accounts_of(request, who), who)


@router.get(
    "/me/tenants",
    response_model=list[MyTenant],
    tags=["auth"],
    operation_id="list_my_tenants",
    summary="My tenants, with my role in each; `current` marks the one this credential acts for",
)
async def my_tenants(who: CurrentPrincipal, request: Request) -> Any:
    return (await _whoami(request, who)).tenants


@router.post(
    "/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    tags=["api-keys"],
    operation_id="create_api_key",
    summary="Create an API key (the secret is returned once)",
    responses={422: {"description": "Invalid body, or expires_at not in the future (application/problem+json)"}},
)
async def create_api_key(body: ApiKeyCreate, request: Request, s: Admin, idempotency: Idempotent) -> Any:
    # The secret is not stored with the answer: a replay shows the key without it.
    return await idempotency.create(
        s,
        lambda last: service.create_key(s.tx, _settings(request), s.ctx.tenant_id, s.ctx.user_id, body, s.cell),
        redact=("key",),
    )


@router.get(
    "/api-keys",
    response_model=list[ApiKeyOut],
    tags=["api-keys"],
    operation_id="list_api_keys",
    summary="List API keys (no secrets)",
)
async def list_api_keys(s: Viewer) -> Any:
    return await service.list_keys(s.tx, s.ctx.tenant_id)


@router.delete(
    "/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    tags=["api-keys"],
    operation_id="revoke_api_key",
    summary="Revoke an API key",
)
async def revoke_api_key(key_id: UUID, request: Request, s: Admin) -> Response:
    if not await service.revoke_key(s.tx, s.ctx.tenant_id, key_id):
        raise not_found("API key", key_id)
    request.app.state.key_cache.clear()
    return Response(status_code=204)
