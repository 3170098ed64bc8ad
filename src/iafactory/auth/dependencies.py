"""From a request's credential to the transaction that runs as its tenant.

    Authorization: Bearer <JWT or API key> | X-API-Key: <key>
        → Principal (who is calling; verified signature or key hash)
        → TenantContext (the tenant the credential names, and nothing else)
        → Database.tenant(ctx, gate=app.authorize(min_role, write))

The tenant never comes from a path, query or body field. Membership, role, tenant status, key
revocation and the token's session (`sid`) are re-checked by `app.authorize` inside the request's
own transaction, in the same round trip as its first statement, so a removed member, a revoked key
or an ended session is refused on the very next request. Routes without a tenant check the session
with `app.check_session` the same way (`session_gate`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from iafactory.admission import CREDENTIALS
from iafactory.auth import api_keys, tokens
from iafactory.cells.routing import CellPools
from iafactory.config import Settings
from iafactory.db.scope import Database, Transaction
from iafactory.http.problems import Problem
from iafactory.plans import ratelimit
from iafactory.tenancy.context import ROLE_RANK, TenantContext, canonical_ip

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
KEY_CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class Principal:
    user_id: int | None
    tenant_id: UUID | None
    role: str | None
    api_key_id: UUID | None = None
    key_scope: str | None = None
    platform_admin: bool = False
    # The cell holding this user (or key) and its tenant; None: the one cell there is.
    cell: str | None = None
    # (cell, user id) of each account of a person with accounts in several cells.
    accounts: tuple[tuple[str, int], ...] = ()
    # The token's session (`sid`): re-checked by the request's gate. None: an API key, or a token
    # from before sessions.
    session_id: UUID | None = None

    def account_in(self, cell: str) -> int | None:
        """This person's user id in `cell` (None: no account there)."""
        if self.cell == cell or self.cell is None:
            return self.user_id
        return dict(self.accounts).get(cell)


@dataclass
class TenantSession:
    """What a tenant-scoped handler receives: the transaction, and who it runs for."""

    tx: Transaction
    ctx: TenantContext
    principal: Principal
    # The cell the transaction runs in; None when the service has only one (API keys then name none).
    cell: str | None = None


def client_ip(request: Request) -> str | None:
    """The peer's address when it is one (test clients and unix sockets may give a name or nothing)."""
    host = request.client.host if request.client else None
    try:
        return canonical_ip(host) if host else None
    except ValueError:
        return None


def unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


# The two ways to present a credential, as FastAPI security classes: they read the headers and,
# because the dependencies below take them as parameters, every operation's `security` in the
# OpenAPI document says which it accepts (Swagger UI's Authorize button sends them). They never
# refuse by themselves (auto_error=False): `_credential` words the 401.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="A token from POST /api/v1/auth/login (or /auth/select-tenant). Where an operation also "
    "lists apiKeyAuth, an API key (iaf_live_...) is accepted here too.",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKeyAuth",
    description="An API key (iaf_live_...) from POST /api/v1/api-keys; it acts for its tenant as a viewer "
    "(read scope) or a member (write scope).",
)

BearerCredential = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
ApiKeyCredential = Annotated[str | None, Depends(api_key_scheme)]


def _credential(request: Request, bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> str:
    if bearer is not None:
        return bearer.credentials
    if request.headers.get("authorization"):  # present, but not "Bearer <value>"
        raise unauthorized("use 'Authorization: Bearer <token or API key>'")
    if api_key:
        return api_key.strip()
    raise unauthorized("missing credentials: send 'Authorization: Bearer <token>' or 'X-API-Key: <key>'")


def tenant_gate(who: Principal, min_role: str, write: bool) -> tuple[str, Any]:
    """The statement that authorises a tenant request: membership, role, tenant status, key
    revocation and, for a token with a session, that the session is still alive."""
    if who.session_id is not None:
        return "SELECT app.authorize(%s, %s, %s)", (min_role, write, who.session_id)
    return "SELECT app.authorize(%s, %s)", (min_role, write)


def session_gate(who: Principal) -> tuple[str, Any] | None:
    """For a transaction with no tenant in the token's own cell: its session still alive."""
    if who.session_id is None:
        return None
    return "SELECT app.check_session(%s)", (who.session_id,)


def cell_pools(request: Request) -> CellPools:
    return request.app.state.cells


def accounts_of(request: Request, who: Principal) -> dict[str, int]:
    """The caller's user id in each cell where they have an account."""
    if who.accounts:
        return dict(who.accounts)
    return {principal_cell(request, who): who.user_id} if who.user_id is not None else {}


def principal_cell(request: Request, who: Principal) -> str:
    """The cell a credential names (a credential from before cells: the first one)."""
    return who.cell or cell_pools(request).home


def cell_db(request: Request, cell: str) -> Database:
    """The pool of `cell`; a credential naming a cell this service does not know is refused."""
    try:
        return cell_pools(request).db(cell)
    except LookupError:
        raise unauthorized(f"credential names an unknown cell {cell!r}") from None


async def _principal_from_key(request: Request, key: str) -> Principal:
    settings: Settings = request.app.state.settings
    parsed = api_keys.parse_prefix(key)
    if parsed is None:
        raise unauthorized("malformed API key")
    prefix, cell = parsed
    pools = cell_pools(request)
    if cell is None and not pools.single:
        raise unauthorized("this API key names no cell: create a new key")
    cell = cell or pools.home
    cache: dict[str, tuple[float, dict[str, Any]]] = request.app.state.key_cache
    hit = cache.get(prefix)
    row: dict[str, Any] | None
    if hit is not None and hit[0] > time.monotonic():
        row = hit[1]
    else:
        row = await _find_key(cell_db(request, cell), prefix)
        if row is None and (moved := await pools.moved_key_cell(prefix)) is not None:
            # The tenant moved to another cell after the key was made: the key keeps working.
            row = await _find_key(cell_db(request, moved), prefix)
            cell = moved
        if row is None:
            raise unauthorized("unknown API key")
        row = {**row, "cell": cell}
        # Revocation and expiry are checked again by app.authorize on every request; the cache
        # only saves the lookup.
        cache[prefix] = (time.monotonic() + KEY_CACHE_SECONDS, row)
    if not pools.single and (moved_row := await _follow_move(request, pools, prefix, row)) is not row:
        cache[prefix] = (time.monotonic() + KEY_CACHE_SECONDS, moved_row)
        row = moved_row
    if not api_keys.matches(settings, key, row["key_hash"]):
        raise unauthorized("unknown API key")
    if row["revoked_at"] is not None:
        raise unauthorized("API key has been revoked")
    if row["expires_at"] is not None and row["expires_at"].timestamp() <= time.time():
        raise unauthorized("API key has expired")
    return Principal(
        user_id=None,
        tenant_id=row["tenant_id"],
        role=None,
        api_key_id=row["id"],
        key_scope=row["scope"],
        cell=row["cell"],
    )


async def _follow_move(request: Request, pools: CellPools, prefix: str, row: dict[str, Any]) -> dict[str, Any]:
    """A key still found in the cell its prefix names while the directory puts its tenant in
    another one: the tenant has just moved (its old copy is being erased). When the directory
    lists the key as moved there, the key is served by the new cell at once."""
    found = await pools.route(row["tenant_id"])
    if found is None or found.cell == row["cell"]:
        return row
    moved = await pools.moved_key_cell(prefix)
    if moved != found.cell:
        return row  # refused by _check_route: the cells disagree
    there = await _find_key(cell_db(request, moved), prefix)
    return {**there, "cell": moved} if there is not None else row


async def _find_key(db: Database, prefix: str) -> dict[str, Any] | None:
    # A lane of its own in the pool: a sign-in flood does not starve API-key lookups.
    async with db.anonymous(lane=CREDENTIALS) as tx:
        return await tx.fetchrow("SELECT * FROM app.authenticate_api_key(%s)", (prefix,))


async def _principal(request: Request, bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> Principal:
    credential = _credential(request, bearer, api_key)
    if api_keys.looks_like_key(credential):
        who = await _principal_from_key(request, credential)
    else:
        who = principal_from_token(request.app.state.settings, credential)
    request.state.principal = who
    return who


def principal_from_token(settings: Settings, token: str) -> Principal:
    """Who a user token says is calling (its signature verified; 401 otherwise)."""
    try:
        claims = tokens.verify(settings, token)
    except tokens.InvalidToken as err:
        raise unauthorized(str(err)) from err
    return Principal(
        claims.user_id,
        claims.tenant_id,
        claims.role,
        platform_admin=claims.platform_admin,
        cell=claims.cell,
        accounts=claims.accounts,
        session_id=claims.session_id,
    )


async def principal(request: Request, bearer: BearerCredential, api_key: ApiKeyCredential) -> Principal:
    """Who is calling, by a JWT or an API key. Verifies the credential; does not yet check it
    against the tenant."""
    return await _principal(request, bearer, api_key)


async def user_principal(request: Request, bearer: BearerCredential) -> Principal:
    """Who is calling, for the routes that need a user's token: only bearerAuth is declared. An API
    key (in either header) is still verified, then refused with 403 by `_user_session`."""
    return await _principal(request, bearer, request.headers.get("x-api-key"))


CurrentPrincipal = Annotated[Principal, Depends(principal)]
UserPrincipal = Annotated[Principal, Depends(user_principal)]


# API keys act as a viewer (read scope) or a member (write scope): routes that need more declare only
# bearerAuth (a key presented anyway is still verified, then refused by app.authorize with 403).
KEY_ROLES = frozenset({"viewer", "member"})


async def tenant_context(request: Request, who: Principal) -> TenantContext:
    """The tenant the credential acts for (403 when a user token has none selected), once the
    directory agrees that the credential's cell holds it (401 otherwise: fail closed)."""
    if who.tenant_id is None:
        raise Problem(
            403, "Forbidden", "no tenant selected: call POST /api/v1/auth/select-tenant first", type_="tenant-required"
        )
    request.state.tenant_id = str(who.tenant_id)
    await _check_route(request, who, who.tenant_id)
    return TenantContext(
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        api_key_id=who.api_key_id,
        role=who.role if who.role in ROLE_RANK else None,
        key_scope=who.key_scope,
        client_ip=client_ip(request),
        request_id=getattr(request.state, "request_id", None),
    )


async def _check_route(request: Request, who: Principal, tenant_id: UUID) -> None:
    pools = cell_pools(request)
    if pools.single:
        if who.cell is not None and who.cell != pools.home:
            raise unauthorized(f"credential names cell {who.cell!r}, which this service does not serve")
        return
    claimed = principal_cell(request, who)
    route = await pools.route(tenant_id)
    if route is None or route.cell != claimed:
        route = await pools.route(tenant_id, fresh=True)  # the cache may predate a move
    if route is None:
        raise unauthorized("unknown tenant")
    if route.cell != claimed:
        raise unauthorized(
            f"this credential names cell {claimed!r}, but the tenant is in cell {route.cell!r}: sign in again "
            "(or select the tenant again) for a new token"
        )


@asynccontextmanager
async def open_tenant_session(
    request: Request, who: Principal, ctx: TenantContext, min_role: str, read_only: bool, *, count: bool = True
) -> AsyncIterator[TenantSession]:
    """The tenant transaction itself, gated on `min_role` and (unless `count` is False: a second
    transaction of the same request) counted by the rate limiter. For a handler that must do slow
    work between transactions (a search embeds its query)."""
    cell = principal_cell(request, who)
    db = cell_db(request, cell)
    gate = tenant_gate(who, min_role, not read_only)
    limiter = request.app.state.rate_limiter
    before = None
    if count and limiter is not None:
        await limiter.hit(ctx.tenant_id, who.api_key_id, db)
    elif count:
        before = ratelimit.postgres_counter(ctx.tenant_id, who.api_key_id)
    async with db.tenant(ctx, read_only=read_only, gate=gate, before=before) as tx:
        yield TenantSession(tx, ctx, who, None if cell_pools(request).single else cell)


def tenant_session(min_role: str = "viewer", *, read_only: bool | None = None):
    """Dependency: a transaction as the credential's tenant, gated on `min_role`. The request owns
    it: it commits after the handler returns and before the response is sent. `read_only`
    defaults to the HTTP method (GET/HEAD read); True for a POST that only reads."""
    if min_role not in ROLE_RANK:
        raise ValueError(min_role)

    async def key_or_token(
        request: Request, bearer: BearerCredential, api_key: ApiKeyCredential
    ) -> AsyncIterator[TenantSession]:
        who = await _principal(request, bearer, api_key)
        async with _tenant_scope(request, who, min_role, read_only) as session:
            yield session

    async def token_only(request: Request, bearer: BearerCredential) -> AsyncIterator[TenantSession]:
        who = await _principal(request, bearer, request.headers.get("x-api-key"))
        async with _tenant_scope(request, who, min_role, read_only) as session:
            yield session

    return Depends(key_or_token if min_role in KEY_ROLES else token_only, scope="function")


@asynccontextmanager
async def _tenant_scope(
    request: Request, who: Principal, min_role: str, read_only: bool | None
) -> AsyncIterator[TenantSession]:
    # A context manager (not a nested generator) so that an error in the handler reaches
    # db.tenant() and rolls the transaction back.
    ctx = await tenant_context(request, who)
    reading = request.method in READ_METHODS if read_only is None else read_only
    async with open_tenant_session(request, who, ctx, min_role, reading) as session:
        yield session


async def _user_session(request: Request, who: UserPrincipal) -> AsyncIterator[tuple[Transaction, Principal]]:
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    db = cell_db(request, principal_cell(request, who))
    async with db.anonymous(
        user_id=who.user_id,
        read_only=request.method in READ_METHODS,
        client_ip=client_ip(request),
        request_id=getattr(request.state, "request_id", None),
        gate=session_gate(who),
    ) as tx:
        yield tx, who


@asynccontextmanager
async def user_transaction(request: Request, who: Principal, cell: str) -> AsyncIterator[Transaction]:
    """A transaction with no tenant in `cell`, as the caller's account there (platform
    administration of a tenant in another cell): 403 when they have none there, since the cell's
    own functions decide with its own users table."""
    user_id = who.account_in(cell) if who.cell is not None or cell == principal_cell(request, who) else None
    if who.user_id is None:
        raise Problem(403, "Forbidden", "this endpoint needs a user token, not an API key")
    if user_id is None:
        raise Problem(403, "Forbidden", f"you have no account in cell {cell!r}, which holds this tenant")
    home = principal_cell(request, who)
    if cell != home:
        await check_session(request, who)  # the session lives in the token's cell
    async with cell_db(request, cell).anonymous(
        user_id=user_id,
        read_only=request.method in READ_METHODS,
        client_ip=client_ip(request),
        request_id=getattr(request.state, "request_id", None),
        gate=session_gate(who) if cell == home else None,
    ) as tx:
        yield tx


async def check_session(request: Request, who: Principal) -> None:
    """A round trip of its own to the token's cell: 401 when its session has ended. For the few
    routes that do no other work there (the others check it in their first round trip)."""
    gate = session_gate(who)
    if gate is None or who.user_id is None:
        return
    async with cell_db(request, principal_cell(request, who)).anonymous(
        user_id=who.user_id, read_only=True, lane=CREDENTIALS
    ) as tx:
        await tx.execute(*gate)


# A transaction with no tenant for a signed-in user (tenant selection, platform administration).
UserSession = Annotated[tuple[Transaction, Principal], Depends(_user_session, scope="function")]

Viewer = Annotated[TenantSession, tenant_session("viewer")]
Member = Annotated[TenantSession, tenant_session("member")]
Admin = Annotated[TenantSession, tenant_session("admin")]
Owner = Annotated[TenantSession, tenant_session("owner")]
