"""Members of the current tenant. Runs in the request's tenant transaction: RLS limits every
statement to this tenant's memberships, and each names the tenant (`tenant_id = %s`). Emails and
names come from app.tenant_members(): a user may read only their own row of `users`."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from iafactory.db.scope import Transaction
from iafactory.http.problems import Problem, not_found
from iafactory.tenancy.schemas import Role


async def list_members(tx: Transaction, tenant_id: UUID) -> list[dict[str, Any]]:
    # The function takes the tenant from the transaction (like RLS), never from an argument.
    return await tx.fetch("SELECT * FROM app.tenant_members()")


async def get_member(tx: Transaction, tenant_id: UUID, user_id: int) -> dict[str, Any]:
    row = await tx.fetchrow("SELECT * FROM app.tenant_members(%s)", (user_id,))
    if row is None:
        raise not_found("member", user_id)
    return row


def _only_owners_make_owners(actor_role: str | None, *roles: str | None) -> None:
    if "owner" in roles and actor_role != "owner":
        raise Problem(403, "Forbidden", "only an owner can grant or change the owner role")


async def _lock_owners(tx: Transaction, tenant_id: UUID) -> set[int]:
    # Serialises concurrent changes to the owner set, so "the last owner" is always well defined.
    rows = await tx.fetch(
        "SELECT user_id FROM tenant_users WHERE tenant_id = %s AND role = 'owner' FOR UPDATE", (tenant_id,)
    )
    return {r["user_id"] for r in rows}


async def actor_role(tx: Transaction, tenant_id: UUID, user_id: int | None) -> str | None:
    if user_id is None:
        return None
    return await tx.fetchval(
        "SELECT role FROM tenant_users WHERE tenant_id = %s AND user_id = %s", (tenant_id, user_id)
    )


async def add_member(tx: Transaction, tenant_id: UUID, actor: int | None, email: str, role: Role) -> dict[str, Any]:
    _only_owners_make_owners(await actor_role(tx, tenant_id, actor), role)
    # Written and read back by one definer function (a Citus transaction may not read, as another
    # role, shard rows it has just changed).
    row = await tx.fetchrow("SELECT * FROM app.add_tenant_member(%s, %s)", (email, role))
    assert row is not None
    if row["outcome"] == "unknown":
        raise Problem(404, "Not Found", f"no account with email {email}: ask them to register first", type_="not-found")
    if row["outcome"] == "member":
        raise Problem(409, "Conflict", f"{email} is already a member", type_="conflict")
    return {k: row[k] for k in ("user_id", "email", "name", "role", "created_at")}


async def change_role(tx: Transaction, tenant_id: UUID, actor: int | None, user_id: int, role: Role) -> dict[str, Any]:
    current = await get_member(tx, tenant_id, user_id)
    _only_owners_make_owners(await actor_role(tx, tenant_id, actor), role, current["role"])
    owners = await _lock_owners(tx, tenant_id)
    if owners == {user_id} and role != "owner":
        raise Problem(
            409, "Conflict", "the last owner cannot be demoted: make someone else owner first", type_="last-owner"
        )
    await tx.execute(
        "UPDATE tenant_users SET role = %s WHERE tenant_id = %s AND user_id = %s", (role, tenant_id, user_id)
    )
    # Not read again through app.tenant_members(): a Citus transaction may not read, as another
    # role, shard rows it has just changed. Only the role changed.
    return {**current, "role": role}


async def remove_member(tx: Transaction, tenant_id: UUID, actor: int | None, user_id: int) -> None:
    current = await get_member(tx, tenant_id, user_id)
    _only_owners_make_owners(await actor_role(tx, tenant_id, actor), current["role"])
    owners = await _lock_owners(tx, tenant_id)
    if owners == {user_id}:
        raise Problem(409, "Conflict", "the last owner cannot be removed", type_="last-owner")
    await tx.execute("DELETE FROM tenant_users WHERE tenant_id = %s AND user_id = %s", (tenant_id, user_id))
