"""From settings to a ready database: migrate, make sure the app's login role exists, open the pool."""

from __future__ import annotations

from collections.abc import Callable

from iafactory.cells import service as cell_service
from iafactory.cells.config import Cell
from iafactory.config import SECRET_HINT, ConfigError, Settings, app_db_password_problem
from iafactory.db import migrate, roles, server
from iafactory.db.scope import Conn, Database, PoolLimits


async def migrate_and_prepare(
    admin_url: str,
    settings: Settings,
    target: str | None = None,
    *,
    on_start: Callable[[migrate.Migration], None] | None = None,
    on_done: Callable[[migrate.Migration, int], None] | None = None,
    cell: Cell | None = None,
) -> list[migrate.Migration]:
    """Migrate, then (under the migration lock) the app's login role and, for a configured cell,
    the regions it serves."""
    # Checked before migrating: a missing or public password changes nothing.
    if settings.database_url is not None and (problem := app_db_password_problem(settings)):
        raise ConfigError(f"{problem} ({SECRET_HINT})")
    password = server.app_login_password(settings)

    async def app_login(conn: Conn) -> None:
        has_group = await (await conn.execute("SELECT 1 AS x FROM pg_roles WHERE rolname = 'iaf_app'")).fetchone()
        if has_group:
            await roles.ensure_app_login(conn, settings.app_db_user, password)
        if cell is not None:
            await cell_service.record_regions(conn, cell)

    # Under the migration lock: replicas starting together create the role once.
    return await migrate.migrate(admin_url, target, on_start=on_start, on_done=on_done, then=app_login)


def database(settings: Settings, admin_url: str) -> Database:
    """The application's pool (not opened yet) for the database behind `admin_url`."""
    return Database(
        server.app_conninfo(settings, admin_url),
        admin_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        limits=PoolLimits(
            queue_timeout=settings.queue_timeout_seconds,
            max_waiting=settings.pool_max_waiting,
            tenant_slots=settings.tenant_max_connections,
            tenant_waiting=settings.tenant_max_waiting,
            anonymous_slots=settings.anonymous_max_connections,
            connect_timeout=settings.db_connect_timeout_seconds,
            reconnect_timeout=settings.db_reconnect_timeout_seconds,
            probe_interval=settings.db_probe_interval_seconds,
        ),
        direct_conninfo=server.app_direct_conninfo(settings, admin_url),
        prepared_statements=server.prepared_statements(settings, admin_url),
    )


async def migrate_everywhere(settings: Settings) -> list[migrate.Migration]:
    """`serve --migrate`: the one database, or with IAFACTORY_CELLS the directory then every cell
    (each recording its regions), and the directory re-synced from the cells."""
    from iafactory.cells.config import cells, directory_cell

    if settings.cells is None:
        return await migrate_and_prepare(server.admin_conninfo(settings), settings)
    applied: list[migrate.Migration] = []
    for cell in [directory_cell(), *cells(settings).values()]:
        url = cell_service.admin_url(settings, cell)
        if cell.url is not None:
            await cell_service.ensure_database(url)
        applied += await migrate_and_prepare(url, cell.settings(settings), cell=cell)
        if cell.url is not None:
            await cell_service.sync_directory(settings, cell)
    return applied
