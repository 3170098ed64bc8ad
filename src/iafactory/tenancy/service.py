"""Platform-level tenant operations (create, list, add a member).

These run on an operator connection (the CLI's admin URL); they never serve a tenant's request.
Services never commit: the caller owns the transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from iafactory.tenancy.schemas import Role, Tenant, TenantCreate, TenantFilters

TENANT_COLUMNS = (
    "id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata, "
    "created_at, updated_at, trial_ends_at"
)


class TenantError(Exception):
    """A tenant operation was refused; the message is meant for the person who asked."""


async def create_tenant(conn: psycopg.AsyncConnection, data: TenantCreate) -> Tenant:
    try:
        cur = await conn.execute(
            f"""INSERT INTO tenants (name, slug, region, plan, status, admin_email, admin_phone,
                                     settings, metadata, trial_ends_at)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING {TENANT_COLUMNS}""",
            (
                data.name, data.slug, data.region, data.plan, data.status, data.admin_email,
                data.admin_phone, Jsonb(data.settings), Jsonb(data.metadata), data.trial_ends_at,
            ),
        )
    except psycopg.errors.UniqueViolation as err:
        raise TenantError(f"slug {data.slug!r} is already taken") from err
    row = await cur.fetchone()
    return Tenant.model_validate(row)


async def list_tenants(conn: psycopg.AsyncConnection, filters: TenantFilters) -> list[Tenant]:
    clauses, params = [], []
    for column in ("region", "plan", "status"):
        value = getattr(filters, column)
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    cur = await conn.execute(f"SELECT {TENANT_COLUMNS} FROM tenants {where} ORDER BY created_at, slug", params)
    return [Tenant.model_validate(r) for r in await cur.fetchall()]


async def add_user(
    conn: psycopg.AsyncConnection, slug: str, email: str, role: Role, *, name: str = "", password_hash: str | None = None
) -> dict[str, Any]:
    """Add (or re-role) a user in a tenant, creating the user if the email is new."""
    tenant = await (await conn.execute("SELECT id FROM tenants WHERE slug = %s", (slug,))).fetchone()
    if tenant is None:
        raise TenantError(f"no tenant with slug {slug!r}")
    user = await (
        await conn.execute(
            """INSERT INTO users (email, name, password_hash) VALUES (%s, %s, %s)
               ON CONFLICT ((lower(email))) DO UPDATE
                   SET password_hash = coalesce(EXCLUDED.password_hash, users.password_hash)
               RETURNING id, email, (xmax = 0) AS created""",
            (email, name, password_hash),
        )
    ).fetchone()
    await conn.execute(
        """INSERT INTO tenant_users (tenant_id, user_id, role) VALUES (%s, %s, %s)
           ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = EXCLUDED.role""",
        (tenant["id"], user["id"], role),
    )
    return {"tenant_id": tenant["id"], "user_id": user["id"], "email": user["email"], "user_created": user["created"]}
