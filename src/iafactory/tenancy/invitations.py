"""Invitations by email (migration 026): an admin invites an address with a role, the email's link
carries a single-use token, and accepting it joins the tenant.

The token is `inv_<cell>_<random>`: its cell routes it without the directory (like an API key's
prefix); only an HMAC of it is stored. Accepting needs no tenant credential: the token names the
invitation, and so the tenant. Services never commit; the caller owns the transaction, in which the
email is queued too (a rolled-back invitation sends nothing).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from iafactory.audit import service as audit
from iafactory.cells.links import CellToken
from iafactory.config import Settings
from iafactory.db.scope import Transaction
from iafactory.http.problems import Problem, not_found
from iafactory.notifications import outbox
from iafactory.tenancy import members

VALID_DAYS = 7
COLUMNS = (
    "id, email, role, invited_by, created_at, expires_at, accepted_at, revoked_at, last_sent_at, "
    "CASE WHEN accepted_at IS NOT NULL THEN 'accepted' WHEN revoked_at IS NOT NULL THEN 'revoked' "
    "WHEN expires_at <= now() THEN 'expired' ELSE 'pending' END AS status"
)


TOKENS = CellToken("inv", b"iafactory-invitation", "/accept-invitation")
new_token, token_cell, link = TOKENS.new, TOKENS.cell, TOKENS.link
digest = TOKENS.digest


async def _send(
    tx: Transaction, settings: Settings, tenant_id: UUID, inviter: int | None, email: str, role: str, token: str
) -> None:
    tenant = await tx.fetchrow("SELECT name, settings FROM tenants WHERE id = %s", (tenant_id,))
    assert tenant is not None
    who = None
    if inviter is not None:
        who = await tx.fetchrow("SELECT name, email FROM users WHERE id = %s", (inviter,))
    inviter_name = (who["name"] or who["email"]) if who else "IAFactory"
    language = outbox.language((tenant["settings"] or {}).get("language"))
    await outbox.enqueue(
        tx,
        email,
        "invitation",
        language,
        {
            "inviter": inviter_name,
            "tenant": tenant["name"],
            "role": role,
            "link": link(settings, token),
            "days": VALID_DAYS,
        },
    )


async def create(
    tx: Transaction,
    settings: Settings,
    tenant_id: UUID,
    cell: str,
    actor: int | None,
    email: str,
    role: str,
    *,
    ip: str | None,
    request_id: str | None,
) -> dict[str, Any]:
    """An admin's invitation (in the request's tenant transaction); the email is queued."""
    members._only_owners_make_owners(await members.actor_role(tx, tenant_id, actor), role)
    if await tx.fetchval("SELECT count(*) FROM app.tenant_members() WHERE lower(email) = lower(%s)", (email,)):
        raise Problem(409, "Conflict", f"{email} is already a member", type_="conflict")
    if await tx.fetchval(
        """SELECT count(*) FROM invitations WHERE tenant_id = %s AND lower(email) = lower(%s)
           AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()""",
        (tenant_id, email),
    ):
        raise Problem(409, "Conflict", f"{email} has a pending invitation: resend or revoke it", type_="conflict")
    token = new_token(cell)
    row = await tx.fetchrow(
        f"""INSERT INTO invitations (tenant_id, email, role, invited_by, token_hash, expires_at)
            VALUES (%s, %s, %s, %s, %s, now() + make_interval(days => %s)) RETURNING {COLUMNS}""",
        (tenant_id, email, role, actor, digest(settings, token), VALID_DAYS),
    )
    assert row is not None
    await _send(tx, settings, tenant_id, actor, email, role, token)
    await _audit_sent(tx, tenant_id, actor, row["id"], email, role, ip, request_id)
    return row


async def list_all(tx: Transaction, tenant_id: UUID) -> list[dict[str, Any]]:
    return await tx.fetch(
        f"SELECT {COLUMNS} FROM invitations WHERE tenant_id = %s ORDER BY created_at DESC, id DESC LIMIT 1000",
        (tenant_id,),
    )


async def _get(tx: Transaction, tenant_id: UUID, invitation_id: UUID) -> dict[str, Any]:
    row = await tx.fetchrow(
        f"SELECT {COLUMNS} FROM invitations WHERE tenant_id = %s AND id = %s FOR UPDATE", (tenant_id, invitation_id)
    )
    if row is None:
        raise not_found("invitation", invitation_id)
    return row


async def resend(
    tx: Transaction,
    settings: Settings,
    tenant_id: UUID,
    cell: str,
    actor: int | None,
    invitation_id: UUID,
    *,
    ip: str | None,
    request_id: str | None,
) -> dict[str, Any]:
    """A new token (the old one is dead at once) valid 7 days from now, emailed again."""
    current = await _get(tx, tenant_id, invitation_id)
    if current["status"] in ("accepted", "revoked"):
        raise Problem(409, "Conflict", f"this invitation was {current['status']}", type_="conflict")
    members._only_owners_make_owners(await members.actor_role(tx, tenant_id, actor), current["role"])
    token = new_token(cell)
    row = await tx.fetchrow(
        f"""UPDATE invitations SET token_hash = %s, expires_at = now() + make_interval(days => %s),
                last_sent_at = now() WHERE tenant_id = %s AND id = %s RETURNING {COLUMNS}""",
        (digest(settings, token), VALID_DAYS, tenant_id, invitation_id),
    )
    assert row is not None
    await _send(tx, settings, tenant_id, actor, row["email"], row["role"], token)
    await audit.record(
        tx,
        tenant_id,
        "invitation.sent",
        user_id=actor,
        details={"invitation_id": str(invitation_id), "email": row["email"], "role": row["role"], "resent": True},
        ip=ip,
        request_id=request_id,
    )
    return row


async def revoke(
    tx: Transaction,
    tenant_id: UUID,
    actor: int | None,
    invitation_id: UUID,
    *,
    ip: str | None,
    request_id: str | None,
) -> None:
    """Revokes a pending invitation (revoking one revoked already changes nothing); 409 once accepted."""
    current = await _get(tx, tenant_id, invitation_id)
    if current["status"] == "accepted":
        raise Problem(409, "Conflict", "this invitation was accepted: remove the member instead", type_="conflict")
    if current["status"] == "revoked":
        return
    members._only_owners_make_owners(await members.actor_role(tx, tenant_id, actor), current["role"])
    await tx.execute(
        "UPDATE invitations SET revoked_at = now() WHERE tenant_id = %s AND id = %s", (tenant_id, invitation_id)
    )
    await audit.record(
        tx,
        tenant_id,
        "invitation.revoked",
        user_id=actor,
        details={"invitation_id": str(invitation_id), "email": current["email"]},
        ip=ip,
        request_id=request_id,
    )


async def create_by_platform(
    tx: Transaction,
    settings: Settings,
    tenant_id: UUID,
    cell: str,
    email: str,
    role: str,
    *,
    actor: int | None = None,
    ip: str | None = None,
    request_id: str | None = None,
) -> tuple[UUID, str]:
    """An invitation written by an operator or a platform administrator (any transaction of the
    tenant's cell); the email is queued. Returns its id and link."""
    token = new_token(cell)
    row = await tx.fetchrow(
        "SELECT * FROM platform.create_invitation(%s, %s, %s, %s, %s, %s)",
        (tenant_id, email, role, digest(settings, token), actor, VALID_DAYS),
    )
    assert row is not None
    tenant = await tx.fetchrow("SELECT * FROM platform.tenant_get(%s, NULL)", (tenant_id,))
    assert tenant is not None
    inviter = None
    if actor is not None:
        inviter = await tx.fetchrow("SELECT name, email FROM users WHERE id = %s", (actor,))
    await outbox.enqueue(
        tx,
        email,
        "invitation",
        outbox.language((tenant["settings"] or {}).get("language")),
        {
            "inviter": (inviter["name"] or inviter["email"]) if inviter else "IAFactory",
            "tenant": tenant["name"],
            "role": role,
            "link": link(settings, token),
            "days": VALID_DAYS,
        },
    )
    await _audit_sent(tx, tenant_id, actor, row["id"], email, role, ip, request_id)
    return row["id"], link(settings, token)


ACCEPT_REFUSALS = {
    "unknown": (404, "this invitation does not exist (or its link was replaced by a newer one)", "invitation-unknown"),
    "used": (409, "this invitation has been used already", "invitation-used"),
    "revoked": (410, "this invitation was revoked", "invitation-revoked"),
    "expired": (410, "this invitation has expired: ask for a new one", "invitation-expired"),
    "inactive": (403, "this tenant is not open", "tenant-inactive"),
    "other_email": (403, "this invitation is for another email than your account's", "invitation-other-email"),
    "exists": (
        409,
        "an account with this email exists: sign in and accept with its token (no name or password)",
        "invitation-sign-in",
    ),
}


def refused(outcome: str) -> Problem:
    status, detail, kind = ACCEPT_REFUSALS[outcome]
    titles = {403: "Forbidden", 404: "Not Found", 409: "Conflict", 410: "Gone"}
    return Problem(status, titles[status], detail, type_=kind)


async def find(tx: Transaction, settings: Settings, token: str) -> dict[str, Any] | None:
    """(tenant_id, id, email) of the invitation the token names, None when none (or, impossibly, two)."""
    rows = await tx.fetch("SELECT * FROM app.find_invitation(%s)", (digest(settings, token),))
    return rows[0] if len(rows) == 1 else None


async def accept(
    tx: Transaction,
    settings: Settings,
    found: dict[str, Any],
    token: str,
    user_id: int | None,
    name: str | None,
    password_hash: str | None,
    *,
    ip: str | None,
    request_id: str | None,
) -> dict[str, Any]:
    """Joins as `user_id`, or as a new account (name, password_hash). A refusal raises its Problem."""
    tenant_id, invitation_id = found["tenant_id"], found["id"]
    row = await tx.fetchrow(
        "SELECT * FROM app.accept_invitation(%s, %s, %s, %s, %s, %s)",
        (tenant_id, invitation_id, digest(settings, token), user_id, name, password_hash),
    )
    assert row is not None
    if row["outcome"] not in ("joined", "member"):
        raise refused(row["outcome"])
    await audit.record(
        tx,
        tenant_id,
        "invitation.accepted",
        user_id=row["user_id"],
        details={
            "invitation_id": str(invitation_id),
            "role": row["role"],
            "new_account": user_id is None,
            "already_member": row["outcome"] == "member",
        },
        ip=ip,
        request_id=request_id,
    )
    return {**row, "tenant_id": tenant_id}


async def _audit_sent(
    tx: Transaction,
    tenant_id: UUID,
    actor: int | None,
    invitation_id: Any,
    email: str,
    role: str,
    ip: str | None,
    request_id: str | None,
) -> None:
    await audit.record(
        tx,
        tenant_id,
        "invitation.sent",
        user_id=actor,
        details={"invitation_id": str(invitation_id), "email": email, "role": role},
        ip=ip,
        request_id=request_id,
    )
