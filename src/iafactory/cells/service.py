"""Which cell holds what: recording a cell's regions, finding a tenant's cell.

Operator work only (the CLI's admin URLs). A cell's regions are written by `iafactory migrate`
when IAFACTORY_CELLS is set, never implicitly: a database that once served only DZ keeps refusing
other regions until it is configured otherwise.
"""

from __future__ import annotations

from uuid import UUID

import psycopg
import psycopg.conninfo
import psycopg.sql

from iafactory.cells import directory
from iafactory.cells.config import Cell, cells, directory_cell
from iafactory.config import Settings
from iafactory.db import server
from iafactory.db.migrate import MigrationError
from iafactory.db.scope import Conn, admin_connect, operator_transaction
from iafactory.tenancy import service as tenancy
from iafactory.tenancy.schemas import Tenant


def admin_url(settings: Settings, cell: Cell) -> str:
    return cell.url or server.admin_conninfo(settings)


def cell_urls(settings: Settings) -> list[tuple[Cell, str]]:
    """Every cell with its admin URL (one, the default, without IAFACTORY_CELLS): for operator work
    that goes over all tenants (monthly grants, re-embedding, verification)."""
    return [(cell, admin_url(settings, cell)) for cell in cells(settings).values()]


async def tenant_admin_url(settings: Settings, slug: str) -> str:
    """The admin URL of the cell that holds `slug` (the only database without IAFACTORY_CELLS)."""
    if settings.cells is None:
        return server.admin_conninfo(settings)
    cell, _ = await find_tenant(settings, slug)
    return admin_url(settings, cell)


async def record_regions(conn: Conn, cell: Cell) -> None:
    """Make `cell`'s database serve exactly `cell.regions` (migration 021's table and trigger).

    Refused while the database holds tenants of a region it would stop serving: they must move
    first. Tenant writes wait for the change (SHARE lock on tenants), so none slips in between the
    check and the new list."""
    exists = await (await conn.execute("SELECT to_regclass('public.cell_regions') IS NOT NULL AS x")).fetchone()
    if not exists or not exists["x"]:
        return  # migrated only up to a version before 021
    regions = list(cell.regions)
    async with conn.transaction():
        await conn.execute("LOCK TABLE public.tenants IN SHARE MODE")
        await _drop_empty_system_tenant(conn, regions)
        stranded = await (
            await conn.execute(
                "SELECT region, count(*) AS n FROM public.tenants WHERE NOT (region = ANY(%s)) "
                "GROUP BY region ORDER BY region",
                (regions,),
            )
        ).fetchall()
        if stranded:
            held = ", ".join(f"{r['n']} of {r['region']}" for r in stranded)
            raise MigrationError(
                f"cell {cell.name} holds tenants of regions it would no longer serve ({held}): "
                "move them to the cell of their region first"
            )
        await conn.execute("DELETE FROM public.cell_regions WHERE NOT (region = ANY(%s))", (regions,))
        await conn.execute(
            "INSERT INTO public.cell_regions (region, cell) SELECT r, %s FROM unnest(%s::text[]) r "
            "ON CONFLICT (region) DO UPDATE SET cell = excluded.cell",
            (cell.name, regions),
        )


async def ensure_database(url: str) -> bool:
    """Create a cell's database when its server answers but the database does not exist yet (the
    demo's cells on the embedded server; a new region's cell). True when it was created."""
    try:
        async with await admin_connect(url):
            return False
    except psycopg.OperationalError as err:
        # A failed connection carries no SQLSTATE (psycopg raises a plain OperationalError, never
        # InvalidCatalogName): ask the server whether the database is what is missing.
        refused = err
    dbname = psycopg.conninfo.conninfo_to_dict(url).get("dbname")
    try:
        maintenance = await admin_connect(server.with_database(url, "postgres"))
    except psycopg.OperationalError:
        raise refused from None  # the server itself does not answer: say why the cell's URL failed
    async with maintenance as conn:
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if await cur.fetchone() is not None:
            raise refused  # the database exists: the failure was something else (password, rights…)
        try:
            await conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(str(dbname))))
        except psycopg.errors.DuplicateDatabase:
            return False
    return True


async def sync_directory(settings: Settings, cell: Cell) -> dict[str, int]:
    """Register in the directory every tenant and login `cell` holds (see directory.sync_from_cell)."""
    async with (
        operator_transaction(admin_url(settings, directory_cell())) as dir_tx,
        operator_transaction(admin_url(settings, cell)) as cell_tx,
    ):
        return await directory.sync_from_cell(dir_tx, cell_tx, settings, cell.name)


async def find_tenant(settings: Settings, slug: str, *, fan_out: bool = False) -> tuple[Cell, Tenant]:
    """The cell holding the tenant `slug`, as the directory says (operators only), or asked of
    every cell with `fan_out` (a tenant the directory does not know yet: just imported).
    TenantNotFound when none has it."""
    configured = cells(settings)
    if settings.cells is not None and not fan_out:
        async with operator_transaction(admin_url(settings, directory_cell())) as dtx:
            found = await directory.route(dtx, slug=slug)
        if found is None or found.cell not in configured:
            raise tenancy.TenantNotFound(f"no tenant with slug {slug!r}")
        cell = configured[found.cell]
        async with operator_transaction(admin_url(settings, cell)) as tx:
            return cell, await tenancy.get_tenant(tx, slug=slug)
    for cell in configured.values():
        async with operator_transaction(admin_url(settings, cell)) as tx:
            try:
                return cell, await tenancy.get_tenant(tx, slug=slug)
            except tenancy.TenantNotFound:
                continue
    raise tenancy.TenantNotFound(f"no tenant with slug {slug!r}")


# Migration 006's "System default" tenant (region CH) owns the rows that predate tenancy.
SYSTEM_TENANT = UUID("00000000-0000-0000-0000-000000000000")


async def _drop_empty_system_tenant(conn: Conn, regions: list[str]) -> None:
    """A cell that does not serve the system tenant's region drops it when it owns nothing (every
    reference to tenants is ON DELETE RESTRICT); when it owns rows it stays, and the caller's
    check refuses the new regions like for any other tenant."""
    try:
        async with conn.transaction():
            deleted = await conn.execute(
                "DELETE FROM public.tenants WHERE id = %s AND NOT (region = ANY(%s))", (SYSTEM_TENANT, regions)
            )
            if deleted.rowcount:
                await conn.execute("DELETE FROM public.tenant_slugs WHERE tenant = %s", (SYSTEM_TENANT,))
    except psycopg.errors.ForeignKeyViolation:
        pass
