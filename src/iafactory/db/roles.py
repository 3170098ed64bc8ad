"""The application's login role: created (or corrected) from configuration after migrating.

Its name and password are deployment settings, so they live here rather than in a migration; the
privileges come from membership in the `iaf_app` group role that migration 008 creates.
"""

from __future__ import annotations

import asyncio

import psycopg
from psycopg import sql

from iafactory.db.migrate import MigrationError
from iafactory.db.scope import Conn


async def ensure_app_login(conn: Conn, user: str, password: str | None) -> None:
    """`password` None: the role logs in some other way (certificate, peer) or keeps its password."""
    group = await (await conn.execute("SELECT 1 AS x FROM pg_roles WHERE rolname = 'iaf_app'")).fetchone()
    if group is None:
        raise MigrationError("role iaf_app does not exist yet: apply migration 008 first")
    role = await (
        await conn.execute(
            """SELECT rolsuper, rolbypassrls,
                  EXISTS (SELECT 1 FROM pg_class c WHERE c.relowner = r.oid
                          AND c.relnamespace = 'public'::regnamespace) AS owns_tables
           FROM pg_roles r WHERE rolname = %s""",
            (user,),
        )
    ).fetchone()
    ident = sql.Identifier(user)
    secret = sql.SQL("") if password is None else sql.SQL(" PASSWORD {}").format(sql.Literal(password))
    if role is None:
        try:
            await conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN{} NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT").format(
                    ident, secret
                )
            )
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            # Created meanwhile by a runner of another database of this cluster (the migration
            # lock serialises runners of one database only): check it as an existing role.
            return await ensure_app_login(conn, user, password)
    elif role["rolsuper"] or role["rolbypassrls"] or role["owns_tables"]:
        # Never demote or reuse a privileged role by accident: that would be a configuration error.
        raise MigrationError(
            f"the configured application role {user!r} is a superuser, bypasses RLS or owns tables; "
            "set IAFACTORY_APP_DB_USER to a dedicated role name"
        )
    else:
        await _shared_catalog(
            conn, sql.SQL("ALTER ROLE {} LOGIN{} NOCREATEDB NOCREATEROLE INHERIT").format(ident, secret)
        )
    await _shared_catalog(conn, sql.SQL("GRANT iaf_app TO {}").format(ident))
    await _propagate_set_local(conn, ident)
    dbname = conn.info.dbname
    await _shared_catalog(conn, sql.SQL("GRANT CONNECT ON DATABASE {} TO iaf_app").format(sql.Identifier(dbname)))


async def _shared_catalog(conn: Conn, statement: sql.Composed, attempts: int = 5) -> None:
    """Roles and database privileges live in catalogs shared by the whole cluster. Two runners
    changing the same row at once (e.g. for two databases) make one fail with "tuple concurrently
    updated"; the statements here are idempotent, so it runs again."""
    for attempt in range(1, attempts + 1):
        try:
            await conn.execute(statement)
            return
        except psycopg.errors.InternalError_ as err:
            if "concurrently" not in str(err) or attempt == attempts:
                raise
            await asyncio.sleep(0.05 * attempt)


async def _propagate_set_local(conn: Conn, role: sql.Identifier) -> None:
    """Citus forwards the tenant setting (a `SET LOCAL`) to the shards only with
    `citus.propagate_set_commands = 'local'` (default 'none'): a role default of the app role.

    On PostgreSQL without Citus the name is a placeholder setting, which a superuser may still set:
    harmless there, and already in place if Citus is added later. A non-superuser admin may not
    set a placeholder; that only matters where Citus is installed, and there it is an error."""
    try:
        await _shared_catalog(conn, sql.SQL("ALTER ROLE {} SET citus.propagate_set_commands = 'local'").format(role))
    except psycopg.errors.InsufficientPrivilege as err:
        citus = await (await conn.execute("SELECT 1 AS x FROM pg_extension WHERE extname = 'citus'")).fetchone()
        if citus is not None:
            raise MigrationError(
                f"cannot set citus.propagate_set_commands = 'local' for the application role: {err}; without it "
                "the tenant setting never reaches the shards"
            ) from err
