"""Test fixtures: a real PostgreSQL, always.

With DATABASE_URL set (e.g. the machine's PostgreSQL 15), tests create their databases on that
server; otherwise on the embedded PostgreSQL 18, started (or reused) in a test data directory:
IAFACTORY_TEST_DATA_DIR, or `.test-pg` in this checkout, so that two checkouts on one machine never
share a server. It keeps running after the tests (the next run reuses it at once);
`IAFACTORY_DATA_DIR=.test-pg .venv/bin/iafactory db stop` stops it.
Every test that changes the schema gets a database of its own, created and dropped here.

With IAFACTORY_TEST_PGBOUNCER=1, the application role's pool (every `settings_for(...)`) goes
through a PgBouncer in transaction mode with 2 server connections per database, started for the
session (scripts/pgbouncer.py); migrations, operator commands and LISTEN stay direct.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from iafactory.config import Settings
from iafactory.db import server

# Shared fixtures live in plugins registered here, so every test module gets them by parameter name
# without importing them: tests/api_support.py (api_client, api_world, module_db, module_api_client,
# module_api_world) and tests/catalog_rows.py (catalog_world). Their plain helpers (login, Seeder,
# row_for, ...) are imported as usual.
pytest_plugins = ["api_support", "catalog_rows"]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import pgbouncer  # noqa: E402  (scripts/pgbouncer.py)

PGBOUNCER_POOL_SIZE = 2  # server connections per database and user: fewer than the service's pool (10)

# Real secrets for this test session: the service has no usable defaults any more (with
# DATABASE_URL they must be configured), and fixed values in a repository would be public ones.
TEST_SECRETS = {name: secrets.token_urlsafe(40) for name in ("jwt_secret", "api_key_secret", "app_db_password")}
SECRET_ENV = {f"IAFACTORY_{name.upper()}": value for name, value in TEST_SECRETS.items()}


def embedded_test_data_dir() -> Path:
    """The data directory of the tests' embedded server: IAFACTORY_TEST_DATA_DIR, else this checkout's own."""
    return Path(os.environ.get("IAFACTORY_TEST_DATA_DIR") or REPO / ".test-pg")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server_url() -> str:
    """Admin URL of the server the tests run against (its maintenance database)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return server.start_embedded(Settings(data_dir=embedded_test_data_dir(), database_url=None))


@pytest.fixture(scope="session")
def server_version(server_url: str) -> int:
    with psycopg.connect(server_url) as conn:
        return conn.info.server_version // 10000


def _create_database(server_url: str) -> tuple[str, str]:
    name = f"iaf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, server.with_database(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_database(server_url: str) -> Iterator[Callable[[], str]]:
    """Factory: a new empty database per call, dropped after the test. Returns its admin URL."""
    created: list[str] = []

    def make() -> str:
        name, url = _create_database(server_url)
        created.append(name)
        return url

    yield make
    for name in created:
        _drop_database(server_url, name)


@pytest.fixture
def empty_db(make_database: Callable[[], str]) -> str:
    return make_database()


def run_cli(
    *args: str, db_url: str | None, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `iafactory` console script against `db_url` (None: DATABASE_URL unset, the
    embedded server), with this session's secrets."""
    full_env = {**os.environ, **SECRET_ENV, **(env or {})}
    full_env.pop("DATABASE_URL", None)
    if db_url is not None:
        full_env["DATABASE_URL"] = db_url
    exe = Path(sys.executable).with_name("iafactory")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, input=input, timeout=300)


def migrate_sync(url: str, target: str | None = None, **kwargs) -> list:
    """Apply migrations with the real runner (what `iafactory migrate` does)."""
    import asyncio

    from iafactory.db import migrate

    return asyncio.run(migrate.migrate(url, target, **kwargs))


def prepare_sync(url: str) -> list:
    """Migrate and create the application's login role, as `iafactory migrate` does."""
    import asyncio

    from iafactory.db.bootstrap import migrate_and_prepare

    return asyncio.run(migrate_and_prepare(url, settings_for(url)))


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a condition (bounded polling, not a sleep standing for one)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for: {what}")
        await asyncio.sleep(0.005)


def settings_for(url: str, **overrides) -> Settings:
    if pooled() and "app_database_url" not in overrides:
        direct = server.app_direct_conninfo(Settings(database_url=url, **TEST_SECRETS), url)
        overrides["app_database_url"] = pooler(url).url(direct)
    return Settings(database_url=url, **{**TEST_SECRETS, **overrides})


def pooled() -> bool:
    """Whether this session runs the application's pool through PgBouncer."""
    return os.environ.get("IAFACTORY_TEST_PGBOUNCER", "") not in ("", "0")


_bouncers: dict[tuple[str, str, int], pgbouncer.Bouncer] = {}


def pooler(url: str, pool_size: int = PGBOUNCER_POOL_SIZE) -> pgbouncer.Bouncer:
    """A PgBouncer (transaction mode) in front of the server of `url`, started once per session."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    key = (params.get("host") or "", params.get("port") or "", pool_size)
    if key not in _bouncers:
        _bouncers[key] = pgbouncer.start(
            url, users=[params.get("user") or "postgres", Settings().app_db_user], pool_size=pool_size
        )
    return _bouncers[key]


@pytest.fixture(scope="session", autouse=True)
def _stop_poolers() -> Iterator[None]:
    yield
    for bouncer in _bouncers.values():
        bouncer.stop()
    _bouncers.clear()


@pytest.fixture(scope="session")
def migrated_template(server_url: str) -> Iterator[str]:
    """The name of a database migrated once for this session, which nobody connects to afterwards:
    the template that `migrated_db`, `module_db` and the like are cloned from (CREATE DATABASE ...
    TEMPLATE copies it in tens of milliseconds, where migrating takes most of a second)."""
    name, url = _create_database(server_url)
    try:
        prepare_sync(url)
        yield name
    finally:
        _drop_database(server_url, name)


def create_migrated_database(server_url: str, template: str) -> tuple[str, str]:
    """A new database, copied from the session's migrated template, then prepared by the real runner
    as `iafactory migrate` would (it finds every migration applied, and grants the application role
    CONNECT on this database: a privilege of the database itself, which a copy does not inherit)."""
    name = f"iaf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = server.with_database(server_url, name)
    try:
        assert prepare_sync(url) == [], "the template database was not fully migrated"
    except BaseException:
        _drop_database(server_url, name)
        raise
    return name, url


@pytest.fixture
def migrated_db(server_url: str, migrated_template: str) -> Iterator[str]:
    """A new database with every migration applied (a copy of the session's migrated template; the
    tests of migrating itself start from `empty_db`). Returns its admin URL; dropped after the test."""
    name, url = create_migrated_database(server_url, migrated_template)
    yield url
    _drop_database(server_url, name)
