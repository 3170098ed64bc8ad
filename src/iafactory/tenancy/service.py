"""Platform-level tenant operations: create, list, change plan or status, add a member.

They go through the `platform.*` SECURITY DEFINER functions (migration 008), which allow an
operator's own login (CLI) or a platform administrator's request, and nobody else. The caller
owns the transaction; nothing here commits.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg.types.json import Jsonb

from iafactory.db.scope import Transaction
from iafactory.tenancy.schemas import Plan, Role, Status, Tenant, TenantCreate, TenantFilters


class TenantError(Exception):
    """A tenant operation was refused; the message is meant for the person who asked."""


class TenantNotFound(TenantError):
    pass


def tenant_values(data: TenantCreate) -> tuple[Any, ...]:
    """A new tenant's columns in the order of platform.tenant_create's arguments (name ... trial_ends_at)."""
    return (
        data.name,
        data.slug,
        data.region,
        data.plan,
        data.status,
        data.admin_email,
        data.admin_phone,
        Jsonb(data.settings),
        Jsonb(data.metadata),
        data.trial_ends_at,
    )


async def create_tenant(tx: Transaction, data: TenantCreate, *, tenant_id: UUID | None = None) -> Tenant:
    """`tenant_id`: an id chosen before (the directory's); default: a new random one."""
    try:
        row = await tx.fetchrow(
            "SELECT * FROM platform.tenant_create(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*tenant_values(data), tenant_id or uuid4()),
        )
    except psycopg.errors.UniqueViolation as err:
        raise TenantError(f"slug {data.slug!r} is already taken") from err
    return Tenant.model_validate(row)


async def create_own_tenant(
    tx: Transaction,
    tenant_id: UUID,
    name: str,
    slug: str,
    region: str,
    *,
    trial_days: int,
    max_trials: int,
) -> Tenant:
    """A self-service tenant (plan free, status trial) owned by the transaction's user, with its
    owner membership and audit events (`tenant.created`, `member.added`), all in this transaction
    (app.create_own_tenant). The request's address and id reach the audit rows through the transaction."""
    try:
        row = await tx.fetchrow(
            "SELECT * FROM app.create_own_tenant(%s, %s, %s, %s, %s, %s)",
            (tenant_id, name, slug, region, trial_days, max_trials),
        )
    except psycopg.errors.UniqueViolation as err:
        raise TenantError(f"slug {slug!r} is already taken") from err
    return Tenant.model_validate(row)


async def list_tenants(
    tx: Transaction, filters: TenantFilters, *, limit: int = 1000, after: tuple[Any, UUID] | None = None
) -> list[Tenant]:
    rows = await tx.fetch(
        "SELECT * FROM platform.tenant_list(%s, %s, %s, %s, %s, %s)",
        (filters.region, filters.plan, filters.status, limit, after[0] if after else None, after[1] if after else None),
    )
    return [Tenant.model_validate(r) for r in rows]


async def all_tenants(tx: Transaction, filters: TenantFilters) -> list[Tenant]:
    """Every tenant matching `filters`, page after page of list_tenants (it returns 1,000 at most)."""
    out: list[Tenant] = []
    while True:
        after = (out[-1].created_at, out[-1].id) if out else None
        page = await list_tenants(tx, filters, limit=1000, after=after)
        out.extend(page)
        if len(page) < 1000:
            return out


async def get_tenant(tx: Transaction, *, tenant_id: UUID | None = None, slug: str | None = None) -> Tenant:
    row = await tx.fetchrow("SELECT * FROM platform.tenant_get(%s, %s)", (tenant_id, slug))
    if row is None:
        raise TenantNotFound(f"no tenant with slug {slug!r}" if slug else f"no tenant {tenant_id}")
    return Tenant.model_validate(row)


async def update_tenant(
    tx: Transaction, tenant_id: UUID, *, plan: Plan | None = None, status: Status | None = None
) -> Tenant:
    row = await tx.fetchrow("SELECT * FROM platform.tenant_update(%s, %s, %s)", (tenant_id, plan, status))
    if row is None:
        raise TenantNotFound(f"no tenant {tenant_id}")
    return Tenant.model_validate(row)


async def add_member(
    tx: Transaction, slug: str, email: str, role: Role, *, name: str = "", password_hash: str | None = None
) -> dict[str, Any]:
    """Add (or re-role) a user in a tenant, creating the user if the email is new."""
    tenant = await get_tenant(tx, slug=slug)
    row = await tx.fetchrow(
        "SELECT * FROM platform.add_member(%s, %s, %s, %s, %s)", (tenant.id, email, role, name, password_hash)
    )
    assert row is not None  # the function returns one row or raises
    return {"tenant_id": tenant.id, **row}


async def set_platform_admin(tx: Transaction, email: str, flag: bool) -> int:
    return await tx.fetchval("SELECT platform.set_platform_admin(%s, %s)", (email, flag))


async def set_limits(tx: Transaction, tenant_id: UUID, limits: dict[str, Any]) -> Tenant:
    row = await tx.fetchrow("SELECT * FROM platform.tenant_set_limits(%s, %s)", (tenant_id, Jsonb(limits)))
    if row is None:
        raise TenantNotFound(f"no tenant {tenant_id}")
    return Tenant.model_validate(row)


async def grant_credits(
    tx: Transaction, tenant_id: UUID, amount: int, reason: str, key: str, kind: str = "grant"
) -> dict[str, Any]:
    row = await tx.fetchrow(
        "SELECT * FROM platform.grant_credits(%s, %s, %s, %s, %s)", (tenant_id, amount, reason, key, kind)
    )
    assert row is not None  # the function returns one row or raises
    return row


async def grant_monthly(tx: Transaction, month: Any = None) -> list[dict[str, Any]]:
    if month is None:
        return await tx.fetch("SELECT * FROM platform.grant_monthly()")
    return await tx.fetch("SELECT * FROM platform.grant_monthly(%s)", (month,))


async def grant_monthly_to(tx: Transaction, tenant_id: UUID, month: Any = None) -> dict[str, Any]:
    """The plan's monthly credits for one tenant, once per month (the key `grant_monthly` uses):
    the row says whether this call granted them, and the balance and currency after it."""
    if month is None:
        row = await tx.fetchrow("SELECT * FROM platform.grant_monthly_to(%s)", (tenant_id,))
    else:
        row = await tx.fetchrow("SELECT * FROM platform.grant_monthly_to(%s, %s)", (tenant_id, month))
    assert row is not None  # the function returns one row or raises
    return row
