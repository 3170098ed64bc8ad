"""Sessions: short-lived access tokens, and opaque refresh tokens rotated on every use.

A sign-in starts a session (a refresh-token family, RFC 9700 §4.14.2) in the cell of the account
its token acts for: the `cell` claim. Its id is the access token's `sid` claim, which the request
gate checks in the same round trip as the request's first statement, so a revoked session is
refused on its very next request. A person with accounts in two cells signs in once: the session
lives in the cell of the token's `cell` claim, and its row keeps the person's accounts so that a
refresh reissues exactly what the sign-in gave (same cell, same accounts, same tenant selected,
with role and membership read again). select-tenant within the same cell keeps the session; into
a tenant of another cell it starts one there (the first one stays, for its own cell).

A refresh token reads `iafr_<cell>_<43 random characters>`: its cell routes it without asking the
directory. Only its SHA-256 is stored (256 random bits: no salt or key needed). Each token is good
for one refresh: the answer carries the next one. Presenting a token that was already used revokes
the whole family and is recorded as a security event: either the client or an attacker replayed
it, and nobody can tell which.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from iafactory.auth import tokens
from iafactory.auth.schemas import Membership
from iafactory.cells.routing import CellPools
from iafactory.config import Settings
from iafactory.db.scope import Transaction
from iafactory.http.problems import Problem

_REFRESH = re.compile(r"^iafr_([a-z][a-z0-9-]{0,31})_([A-Za-z0-9_-]{43})$")
USER_AGENT_MAX = 300


@dataclass
class Issued:
    access_token: str
    expires_in: int
    refresh_token: str
    session_id: uuid.UUID
    cell: str


def new_refresh_token(cell: str) -> tuple[str, bytes]:
    token = f"iafr_{cell}_{secrets.token_urlsafe(32)}"
    return token, digest(token)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse(token: str) -> str | None:
    """The cell a well-formed refresh token names, else None."""
    match = _REFRESH.match(token)
    return match.group(1) if match else None


def refused(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"}, type_="session-ended")


def session_cell(pools: CellPools, accounts: dict[str, int], tenant: Membership | None) -> str:
    """The cell a token for `tenant` acts in: the tenant's, else the person's first account's."""
    return (tenant.cell if tenant else None) or next(iter(accounts))


async def security_event(
    tx: Transaction,
    event: str,
    *,
    user_id: int | None,
    session_id: uuid.UUID | None = None,
    ip: str | None,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    await tx.execute(
        "SELECT app.record_security_event(%s, %s, %s, %s, %s, %s)",
        (event, user_id, session_id, ip, request_id, Jsonb(details or {})),
    )


def _access(
    settings: Settings,
    cell: str,
    accounts: dict[str, int],
    tenant: Membership | None,
    platform_admin: bool,
    session_id: uuid.UUID,
) -> tuple[str, int]:
    return tokens.issue(
        settings,
        accounts[cell],
        tenant_id=tenant.id if tenant else None,
        role=tenant.role if tenant else None,
        platform_admin=platform_admin,
        cell=cell,
        accounts=accounts,
        session_id=session_id,
    )


async def start(
    pools: CellPools,
    settings: Settings,
    accounts: dict[str, int],
    tenant: Membership | None,
    platform_admin: bool,
    *,
    ip: str | None,
    user_agent: str | None,
) -> Issued:
    """A new session for a sign-in (or select-tenant into another cell): its first tokens."""
    cell = session_cell(pools, accounts, tenant)
    sid = uuid.uuid4()
    refresh, hashed = new_refresh_token(cell)
    async with pools.db(cell).anonymous(user_id=accounts[cell]) as tx:
        await tx.execute(
            "SELECT app.session_start(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                sid,
                accounts[cell],
                hashed,
                tenant.id if tenant else None,
                Jsonb(accounts) if len(accounts) > 1 else None,
                ip,
                (user_agent or "")[:USER_AGENT_MAX] or None,
                settings.refresh_token_idle_seconds,
                settings.refresh_token_absolute_seconds,
            ),
            last=True,
        )
    access, ttl = _access(settings, cell, accounts, tenant, platform_admin, sid)
    return Issued(access, ttl, refresh, sid, cell)


async def reselect(
    pools: CellPools,
    settings: Settings,
    cell: str,
    session_id: uuid.UUID,
    accounts: dict[str, int],
    tenant: Membership,
    platform_admin: bool,
) -> Issued | None:
    """select-tenant within the session's own cell: the same session, acting for `tenant`, with a
    new refresh token (the previous one is spent). None when the session has ended."""
    refresh, hashed = new_refresh_token(cell)
    async with pools.db(cell).anonymous(user_id=accounts[cell]) as tx:
        ok = await tx.fetchval("SELECT app.session_select(%s, %s, %s)", (session_id, tenant.id, hashed))
    if not ok:
        return None
    access, ttl = _access(settings, cell, accounts, tenant, platform_admin, session_id)
    return Issued(access, ttl, refresh, session_id, cell)


@dataclass
class Refreshed:
    issued: Issued
    accounts: dict[str, int]
    selected_tenant: uuid.UUID | None
    platform_admin: bool


async def refresh(
    pools: CellPools,
    settings: Settings,
    token: str,
    *,
    ip: str | None,
    user_agent: str | None,
    request_id: str | None,
) -> Refreshed:
    """Spend `token` for a new pair. 401 for an unknown, spent, revoked or expired token; a spent
    one also revokes its family (and says so in the security log)."""
    cell = parse(token)
    if cell is None or cell not in pools.dbs:
        raise refused("invalid refresh token")
    new, new_hash = new_refresh_token(cell)
    async with pools.db(cell).anonymous() as tx:
        row = await tx.fetchrow(
            "SELECT * FROM app.session_refresh(%s, %s, %s, %s, %s, %s)",
            (
                digest(token),
                new_hash,
                ip,
                (user_agent or "")[:USER_AGENT_MAX] or None,
                settings.refresh_token_idle_seconds,
                settings.refresh_token_absolute_seconds,
            ),
        )
        assert row is not None
        if row["outcome"] == "reused":
            await security_event(
                tx,
                "auth.refresh_token_reused",
                user_id=row["user_id"],
                session_id=row["session_id"],
                ip=ip,
                request_id=request_id,
                details={"action": "session revoked"},
            )
    outcome = row["outcome"]
    if outcome == "unknown":
        raise refused("invalid refresh token")
    if outcome == "reused":
        raise refused("this refresh token was already used: the session has been ended, sign in again")
    if outcome != "ok":
        raise refused(f"the session has ended ({outcome}): sign in again")
    accounts = {str(c): int(u) for c, u in (row["accounts"] or {cell: row["user_id"]}).items()}
    accounts[cell] = row["user_id"]
    sid = row["session_id"]
    # The access token is made by the caller, once it knows whether the tenant is still selectable.
    return Refreshed(Issued("", 0, new, sid, cell), accounts, row["selected_tenant"], bool(row["is_platform_admin"]))


def reissue(settings: Settings, refreshed: Refreshed, tenant: Membership | None) -> Issued:
    """The access token of a refresh, acting for `tenant` (the session's, if still selectable)."""
    i = refreshed.issued
    access, ttl = _access(settings, i.cell, refreshed.accounts, tenant, refreshed.platform_admin, i.session_id)
    return Issued(access, ttl, i.refresh_token, i.session_id, i.cell)


async def end(pools: CellPools, cell: str, user_id: int, session_id: uuid.UUID, reason: str) -> bool:
    """Revoke one session of `user_id` in `cell`; False when it is not theirs or already ended."""
    async with pools.db(cell).anonymous(user_id=user_id) as tx:
        return bool(await tx.fetchval("SELECT app.revoke_my_session(%s, %s)", (session_id, reason)))


async def end_all(
    pools: CellPools,
    accounts: dict[str, int],
    *,
    keep: uuid.UUID | None,
    reason: str,
    ip: str | None,
    request_id: str | None,
    event: str | None,
) -> int:
    """Revoke every session of the person (each of their accounts, in its cell) but `keep`."""
    count = 0
    for cell, user_id in accounts.items():
        async with pools.db(cell).anonymous(user_id=user_id) as tx:
            n = int(await tx.fetchval("SELECT app.revoke_my_sessions(%s, %s)", (keep, reason)))
            if event is not None:
                await security_event(
                    tx, event, user_id=user_id, session_id=keep, ip=ip, request_id=request_id, details={"ended": n}
                )
            count += n
    return count


async def listing(pools: CellPools, accounts: dict[str, int], current: uuid.UUID | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for cell, user_id in accounts.items():
        async with pools.db(cell).anonymous(user_id=user_id, read_only=True) as tx:
            for row in await tx.fetch("SELECT * FROM app.my_sessions()"):
                out.append(
                    {
                        **row,
                        "ip": str(row["ip"]) if row["ip"] is not None else None,
                        "current": row["id"] == current,
                        "cell": None if pools.single else cell,
                    }
                )
    out.sort(key=lambda r: r["last_used_at"], reverse=True)
    return out
