"""The directory: which cell holds a tenant, and in which cells a login email has an account.

It lives in the DATABASE_URL database when IAFACTORY_CELLS is set (migration 022's `directory`
schema) and holds only routing facts: tenant id, slug, region, cell, plan, status; and a keyed
hash of each login email with the cells where it has an account — never a name, a plaintext email
or a row of a tenant table. Without IAFACTORY_CELLS there is one cell and no directory: every
tenant is in it.

Writes that span the directory and a cell go directory first: a directory row whose cell never
got the tenant (or the account) routes to a cell that refuses it, which is harmless, while the
other order could leave data nobody can reach. `iafactory migrate` re-derives the directory from
the cells (`sync_from_cell`), which also repairs what a crash left half done.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from iafactory.config import Settings
from iafactory.db.scope import Transaction
from iafactory.tenancy import service as tenancy
from iafactory.tenancy.schemas import TenantFilters


class DirectoryError(Exception):
    """A directory change was refused; the message is meant for the person who asked."""


@dataclass(frozen=True, slots=True)
class Route:
    tenant_id: UUID
    slug: str
    region: str
    cell: str
    plan: str
    status: str
    moving_to: str | None = None


ROUTE_COLUMNS = "id AS tenant_id, slug, region, cell, plan, status, moving_to"


def email_hash(settings: Settings, email: str) -> bytes:
    """The directory's name for a (normalised) login email: an HMAC, so the directory alone does
    not tell who has an account. Keyed with the API-key secret, under a label of its own."""
    key = settings.secret("api_key_secret").encode()
    return hmac.new(key, b"iafactory-directory-email\0" + email.encode(), hashlib.sha256).digest()


async def record_tenant(tx: Transaction, route: Route) -> None:
    """Register (or update) a tenant's route. A slug taken by another tenant is refused."""
    try:
        await tx.execute(
            """INSERT INTO directory.tenants (id, slug, region, cell, plan, status)
               VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET slug = excluded.slug, region = excluded.region,
                   cell = excluded.cell, plan = excluded.plan, status = excluded.status, updated_at = now()""",
            (route.tenant_id, route.slug, route.region, route.cell, route.plan, route.status),
        )
    except psycopg.errors.UniqueViolation as err:
        raise DirectoryError(f"slug {route.slug!r} is already taken") from err


@asynccontextmanager
async def reserved(
    open_directory: Callable[[], AbstractAsyncContextManager[Transaction]], route: Route
) -> AsyncIterator[None]:
    """Directory first: the route is recorded (a slug taken by another tenant: DirectoryError),
    then the caller creates the tenant in its cell; if that fails, the route is taken back."""
    async with open_directory() as dtx:
        await record_tenant(dtx, route)
    try:
        yield
    except BaseException:
        async with open_directory() as dtx:
            await forget_tenant(dtx, route.tenant_id)
        raise


async def update_tenant(tx: Transaction, tenant_id: UUID, *, plan: str, status: str) -> None:
    await tx.execute(
        "UPDATE directory.tenants SET plan = %s, status = %s, updated_at = now() WHERE id = %s",
        (plan, status, tenant_id),
    )


async def forget_tenant(tx: Transaction, tenant_id: UUID) -> None:
    await tx.execute("DELETE FROM directory.tenants WHERE id = %s", (tenant_id,))


async def route(tx: Transaction, *, tenant_id: UUID | None = None, slug: str | None = None) -> Route | None:
    if tenant_id is not None:
        row = await tx.fetchrow(f"SELECT {ROUTE_COLUMNS} FROM directory.tenants WHERE id = %s", (tenant_id,))
    else:
        row = await tx.fetchrow(f"SELECT {ROUTE_COLUMNS} FROM directory.tenants WHERE slug = %s", (slug,))
    return Route(**row) if row else None


async def routes(
    tx: Transaction, filters: TenantFilters, *, limit: int = 1000, after: tuple[Any, UUID] | None = None
) -> list[dict[str, Any]]:
    """Routes in registry order (created_at, id), filtered, after a cursor; with created_at."""
    return await tx.fetch(
        f"""SELECT {ROUTE_COLUMNS}, created_at FROM directory.tenants
            WHERE (%s::text IS NULL OR region = %s) AND (%s::text IS NULL OR plan = %s)
              AND (%s::text IS NULL OR status = %s)
              AND (%s::timestamptz IS NULL OR (created_at, id) > (%s, %s::uuid))
            ORDER BY created_at, id LIMIT %s""",
        (
            *(filters.region, filters.region, filters.plan, filters.plan, filters.status, filters.status),
            *((after[0], after[0], after[1]) if after else (None, None, None)),
            limit,
        ),
    )


async def record_login(tx: Transaction, settings: Settings, email: str, cell: str) -> None:
    await tx.execute(
        "INSERT INTO directory.logins (email_hmac, cell) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (email_hash(settings, email), cell),
    )


async def login_cells(tx: Transaction, settings: Settings, email: str) -> list[str]:
    rows = await tx.fetch(
        "SELECT cell FROM directory.logins WHERE email_hmac = %s ORDER BY created_at, cell",
        (email_hash(settings, email),),
    )
    return [r["cell"] for r in rows]


async def moved_key_cell(tx: Transaction, prefix: str) -> str | None:
    return await tx.fetchval("SELECT cell FROM directory.moved_api_keys WHERE prefix = %s", (prefix,))


async def sync_from_cell(directory: Transaction, cell_tx: Transaction, settings: Settings, cell: str) -> dict[str, int]:
    """Make the directory agree with what `cell` holds: its tenants' routes and its people's login
    hashes (run by `iafactory migrate` for every cell). A tenant the directory places in another
    cell is left alone: that is a move in progress or a conflict for an operator, never silently
    re-routed. Returns counts."""
    placed = 0
    for t in await tenancy.all_tenants(cell_tx, TenantFilters()):
        current = await route(directory, tenant_id=t.id)
        if current is not None and current.cell != cell:
            continue
        await record_tenant(directory, Route(t.id, t.slug, t.region, cell, t.plan, t.status))
        placed += 1
    emails = await cell_tx.fetch("SELECT email FROM platform.login_emails()")
    for e in emails:
        await record_login(directory, settings, e["email"], cell)
    return {"tenants": placed, "logins": len(emails)}
