"""Sign-up, sign-in, tenant selection and API keys. Services never commit.

Password hashing never happens while a transaction (and so a pooled connection) is open: a
sign-in reads the stored hash in one short transaction, verifies it with none open, and records
the sign-in in a second one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from fastapi.exceptions import RequestValidationError

from iafactory.admission import ANONYMOUS, CREDENTIALS, CpuWork
from iafactory.audit import service as audit
from iafactory.auth import api_keys, passwords, policy, sessions, verification
from iafactory.auth.dependencies import Principal, session_gate, tenant_gate
from iafactory.auth.schemas import ApiKeyCreate, LoginIn, Membership, MeOut, MyTenant, RegisterIn
from iafactory.cells import directory
from iafactory.cells.config import cell_for_region, cells
from iafactory.cells.routing import CellPools
from iafactory.config import Settings
from iafactory.db.scope import Transaction
from iafactory.http.problems import Problem
from iafactory.observability import metrics
from iafactory.tenancy.context import TenantContext

SELECTABLE = ("active", "trial")
KEY_COLUMNS = "id, name, prefix, scope, created_at, expires_at, last_used_at, revoked_at"


async def register(
    pools: CellPools,
    settings: Settings,
    cpu: CpuWork,
    data: RegisterIn,
    *,
    accept_language: str | None,
    ip: str | None,
    request_id: str | None,
) -> None:
    """The same work whether or not the email has an account (verification.py): the password is
    hashed, both emails rendered, the directory told (a no-op for a known login), and one statement
    (app.register_account) creates the unverified account and queues "verify your address", or
    queues "you already have an account" and changes nothing. Nothing of it reaches the answer."""
    cpu.gate.check_room(ANONYMOUS)  # a full hashing queue: refuse before doing anything
    cell = _cell_for(pools, settings, data.region)
    hashed = await passwords.hash_password(settings, data.password, cpu)
    token = verification.new_token(cell)
    mail = verification.messages(settings, token, accept_language)
    if pools.directory_db is not None:
        # Directory first: an entry whose account is missing routes a sign-in to a cell that says
        # "wrong email or password"; the other order could leave an account nobody can reach.
        async with pools.directory_db.anonymous() as tx:
            await directory.record_login(tx, settings, data.email, cell)
    async with pools.db(cell).anonymous(client_ip=ip, request_id=request_id) as tx:
        row = await tx.fetchrow(
            "SELECT * FROM app.register_account(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                data.email,
                data.name,
                hashed,
                verification.digest(settings, token),
                verification.VERIFY_HOURS,
                ip,
                *verification.parts(mail.verify),
                *verification.parts(mail.exists),
            ),
        )
        assert row is not None
        await sessions.security_event(
            tx,
            "auth.register_requested",
            user_id=row["user_id"],
            ip=ip,
            request_id=request_id,
            details={"new_account": row["created"]},
        )


def _cell_for(pools: CellPools, settings: Settings, region: str | None) -> str:
    if region is None or pools.single:
        return pools.home
    return cell_for_region(cells(settings), region).name


@dataclass
class SignedIn:
    accounts: dict[str, int]  # the person's user id in each cell where the password matched
    platform_admin: bool
    tenants: list[Membership]
    selected: Membership | None


async def sign_in(
    pools: CellPools, settings: Settings, cpu: CpuWork, data: LoginIn, *, ip: str | None, request_id: str | None
) -> SignedIn:
    """Email first: the directory says in which cells the email has an account; the password is
    checked in each (a consultant has one per cell). Their tenants, and the one selected for them
    when they have exactly one."""
    cpu.gate.check_room(ANONYMOUS)  # a full hashing queue: refuse before reading anything
    found: list[tuple[str, dict[str, Any]]] = []
    for cell in await pools.login_cells(settings, data.email):
        async with pools.db(cell).anonymous(read_only=True) as tx:
            row = await tx.fetchrow("SELECT * FROM app.find_login(%s)", (data.email,))
        if row is not None:
            found.append((cell, row))
    matched = []
    candidates: list[tuple[str, dict[str, Any] | None]] = [*found] or [("", None)]
    for cell, row in candidates:
        # Unknown emails cost a hash too, so timing does not tell who has an account.
        hashed = row["password_hash"] if row else None
        if await passwords.verify_password(settings, hashed, data.password, cpu) and row is not None:
            matched.append((cell, row))
    if not matched:
        metrics.count_login_failure("bad_credentials")
        await _record_failure(pools, found, ip=ip, request_id=request_id)
        raise Problem(401, "Unauthorized", "wrong email or password", headers={"WWW-Authenticate": "Bearer"})
    active = [(cell, row) for cell, row in matched if row["is_active"]]
    if not active:
        metrics.count_login_failure("disabled")
        raise Problem(403, "Forbidden", "this account is disabled")
    tenants: list[Membership] = []
    for cell, row in active:
        async with pools.db(cell).anonymous() as tx:
            await tx.execute("SELECT app.record_login(%s)", (row["user_id"],))
            tenants.extend(await memberships(tx, row["user_id"], None if pools.single else cell))
    open_tenants = [t for t in tenants if t.status in SELECTABLE]
    selected = open_tenants[0] if len(tenants) == 1 and open_tenants else None
    for cell, row in active:
        async with pools.db(cell).anonymous() as tx:
            # Every tenant this sign-in can reach records it, in its own cell.
            for tenant in [t for t in tenants if t.cell in (cell, None)][:50]:
                await audit.record(
                    tx,
                    tenant.id,
                    "auth.login",
                    user_id=row["user_id"],
                    details={"selected": selected is not None and selected.id == tenant.id},
                    ip=ip,
                    request_id=request_id,
                )
    return SignedIn(
        {cell: row["user_id"] for cell, row in active},
        any(row["is_platform_admin"] for _, row in active),
        tenants,
        selected,
    )


async def _record_failure(
    pools: CellPools, found: list[tuple[str, dict[str, Any]]], *, ip: str | None, request_id: str | None
) -> None:
    """A failed sign-in, in the security log (never the password): in the cell of each account
    the email has, or, for an unknown email, in the first cell with no user named. Not in the
    tenants' audit logs: the attempt concerns a person, not a tenant, and a person in 50 tenants
    would cost 50 rows per guess to whoever floods the sign-in."""
    targets: list[tuple[str, dict[str, Any] | None]] = [*found] or [(pools.home, None)]
    for cell, row in targets:
        async with pools.db(cell).anonymous(lane=CREDENTIALS) as tx:
            await sessions.security_event(
                tx,
                "auth.login_failed",
                user_id=row["user_id"] if row else None,
                ip=ip,
                request_id=request_id,
                details={"reason": "wrong password" if row else "unknown email"},
            )


async def memberships(tx: Transaction, user_id: int, cell: str | None = None) -> list[Membership]:
    rows = await tx.fetch("SELECT * FROM app.user_memberships(%s)", (user_id,))
    return [
        Membership(id=r["tenant_id"], slug=r["slug"], name=r["name"], role=r["role"], status=r["status"], cell=cell)
        for r in rows
    ]


async def all_memberships(pools: CellPools, accounts: dict[str, int]) -> list[Membership]:
    """A person's tenants in every cell where they have an account."""
    out: list[Membership] = []
    for cell, user_id in accounts.items():
        async with pools.db(cell).anonymous(user_id=user_id, read_only=True) as tx:
            out.extend(await memberships(tx, user_id, None if pools.single else cell))
    return out


def check_new_password(password: str, email: str, field: str = "new_password") -> str:
    """The policy's checks that need the account (not its own email); 422 naming the field."""
    reason = policy.problem(password, email)
    if reason is not None:
        raise RequestValidationError([{"loc": ("body", field), "msg": reason, "type": "value_error", "input": None}])
    return password


def choose(tenants: list[Membership], wanted: str) -> Membership:
    """The membership named by id or slug; 403 when the user is not a member or it is closed."""
    try:
        wanted_id: UUID | None = UUID(wanted)
    except ValueError:
        wanted_id = None
    for m in tenants:
        if m.id == wanted_id or m.slug == wanted:
            if m.status not in SELECTABLE:
                raise Problem(403, "Forbidden", f"tenant {m.slug} is {m.status}", type_="tenant-inactive")
            return m
    raise Problem(403, "Forbidden", "you are not a member of this tenant", type_="not-a-member")


async def create_key(
    tx: Transaction,
    settings: Settings,
    tenant_id: UUID,
    user_id: int | None,
    data: ApiKeyCreate,
    cell: str | None = None,
) -> dict[str, Any]:
    key, prefix = api_keys.generate(settings, cell)
    row = await tx.fetchrow(
        f"""INSERT INTO api_keys (tenant_id, name, prefix, key_hash, scope, created_by, expires_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {KEY_COLUMNS}""",
        (tenant_id, data.name, prefix, api_keys.digest(settings, key), data.scope, user_id, data.expires_at),
    )
    assert row is not None
    return {**row, "key": key}


async def list_keys(tx: Transaction, tenant_id: UUID) -> list[dict[str, Any]]:
    return await tx.fetch(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at DESC, id DESC", (tenant_id,)
    )


async def revoke_key(tx: Transaction, tenant_id: UUID, key_id: UUID) -> bool:
    """Revokes the key (a key revoked already keeps its first revocation time); False if no such key.
    Two plain statements rather than `coalesce(revoked_at, now())`, which a distributed UPDATE refuses."""
    if await tx.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = %s AND id = %s AND revoked_at IS NULL",
        (tenant_id, key_id),
    ):
        return True
    return await tx.fetchval("SELECT count(*) FROM api_keys WHERE tenant_id = %s AND id = %s", (tenant_id, key_id)) > 0


async def whoami(pools: CellPools, cell: str, accounts: dict[str, int], who: Principal) -> MeOut:
    """The caller, all their tenants in every cell (the one this credential acts for marked
    `current`) and, with a tenant selected, their current role (re-checked by the same gate as
    every tenant request). The caller has checked that `cell` holds the credential's tenant."""
    db = pools.db(cell)
    user_sql = (
        "SELECT id, email, name, is_platform_admin, email_verified_at IS NOT NULL AS email_verified, created_at "
        "FROM users WHERE id = %s"
    )
    label = None if pools.single else cell
    others = {c: u for c, u in accounts.items() if c != cell}
    elsewhere = await all_memberships(pools, others) if others else []
    if who.tenant_id is None:
        async with db.anonymous(user_id=who.user_id, read_only=True, gate=session_gate(who)) as tx:
            user = await tx.fetchrow(user_sql, (who.user_id,))
            tenants = await memberships(tx, who.user_id, label) if who.user_id else []
        return MeOut(user=user, tenant=None, role=None, tenants=_marked([*tenants, *elsewhere], None))
    ctx = TenantContext(tenant_id=who.tenant_id, user_id=who.user_id, api_key_id=who.api_key_id)
    async with db.tenant(ctx, read_only=True, gate=tenant_gate(who, "viewer", False)) as tx:
        tenant = await tx.fetchrow("SELECT id, slug, name, status FROM tenants WHERE id = %s", (who.tenant_id,))
        if who.user_id is not None:
            user = await tx.fetchrow(user_sql, (who.user_id,))
            role = await tx.fetchval(
                "SELECT role FROM tenant_users WHERE tenant_id = %s AND user_id = %s", (who.tenant_id, who.user_id)
            )
            tenants = [*await memberships(tx, who.user_id, label), *elsewhere]
        else:
            user, role = None, "member" if who.key_scope == "write" else "viewer"
            tenants = []
    assert tenant is not None  # the gate refused otherwise
    membership = Membership(
        id=tenant["id"], slug=tenant["slug"], name=tenant["name"], role=role, status=tenant["status"], cell=label
    )
    if who.user_id is None:
        tenants = [membership]  # an API key belongs to exactly one tenant
    return MeOut(
        user=user, tenant=membership, role=role, api_key_id=who.api_key_id, tenants=_marked(tenants, who.tenant_id)
    )


def _marked(tenants: list[Membership], current: UUID | None) -> list[MyTenant]:
    return [MyTenant(**t.model_dump(), current=t.id == current) for t in tenants]
