"""Replicas starting together: several `iafactory migrate` (and `iafactory serve`) processes, the
installed console script, started at the same moment against a fresh database, all succeed.

The defect: `migrate` created the embedded database and the application's login role outside its
advisory lock; two runners both saw them missing, both created them, and one exited 1 (5 of 13
trials), although the schema was right each time. Each trial here uses a fresh database and a
fresh login role name, so that both creations are really raced.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import SECRET_ENV, _drop_database, embedded_test_data_dir
from iafactory.db import migrate, server

EXE = str(Path(sys.executable).with_name("iafactory"))
TRIALS = 3
RUNNERS = 3


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("IAFACTORY_")}
    env.update(SECRET_ENV)
    # Nothing the runners do here needs the embedding model or an indexing worker.
    env.update(IAFACTORY_EMBEDDING_PROVIDER="none", IAFACTORY_RUN_WORKER="false", **extra)
    return env


def run_together(args: list[str], env: dict[str, str], count: int = RUNNERS) -> list[tuple[int, str]]:
    procs = [
        subprocess.Popen([EXE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out + err))
    return results


@pytest.fixture
def roles(server_url: str) -> Iterator[Callable[[], str]]:
    """Factory: a fresh name for the application's login role, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(f"iaf_app_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    with psycopg.connect(server_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def assert_migrated_once(url: str, login: str) -> None:
    with psycopg.connect(url) as conn:
        counts = conn.execute("SELECT version, count(*) FROM schema_migrations GROUP BY 1 ORDER BY 1").fetchall()
        member = conn.execute("SELECT pg_has_role(%s, 'iaf_app', 'MEMBER')", (login,)).fetchone()[0]
    assert counts == [(m.version, 1) for m in migrate.discover()]
    assert member


def test_concurrent_migrate_runners_on_a_fresh_database_all_succeed(
    make_database: Callable[[], str], roles: Callable[[], str]
) -> None:
    for _ in range(TRIALS):
        url, login = make_database(), roles()
        results = run_together(["migrate"], base_env(DATABASE_URL=url, IAFACTORY_APP_DB_USER=login))
        assert [code for code, _ in results] == [0] * RUNNERS, results
        assert_migrated_once(url, login)


def embedded_data_dir() -> Path:
    """The data directory of the embedded server the suite runs on (see conftest.server_url)."""
    return embedded_test_data_dir()


@pytest.fixture
def embedded_names(server_url: str) -> Iterator[Callable[[], str]]:
    """Factory: a fresh database name in the embedded server, dropped after the test."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("runs on the embedded server (the DATABASE_URL variant is the test above)")
    made: list[str] = []

    def make() -> str:
        made.append(f"iaf_test_{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    for name in made:
        _drop_database(server_url, name)


def test_concurrent_migrate_runners_create_the_embedded_database_once(
    server_url: str, embedded_names: Callable[[], str], roles: Callable[[], str]
) -> None:
    for _ in range(TRIALS):
        name, login = embedded_names(), roles()
        env = base_env(
            IAFACTORY_DATA_DIR=str(embedded_data_dir()), IAFACTORY_EMBEDDED_DB_NAME=name, IAFACTORY_APP_DB_USER=login
        )
        results = run_together(["migrate"], env)
        assert [code for code, _ in results] == [0] * RUNNERS, results
        assert_migrated_once(server.with_database(server_url, name), login)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_serve_processes_booting_together_both_come_up(
    server_url: str, make_database: Callable[[], str], roles: Callable[[], str]
) -> None:
    login = roles()
    if os.environ.get("DATABASE_URL"):
        env = base_env(DATABASE_URL=make_database(), IAFACTORY_APP_DB_USER=login)
    else:
        name = f"iaf_test_{uuid.uuid4().hex[:12]}"
        env = base_env(
            IAFACTORY_DATA_DIR=str(embedded_data_dir()), IAFACTORY_EMBEDDED_DB_NAME=name, IAFACTORY_APP_DB_USER=login
        )
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [EXE, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for port in ports
    ]
    try:
        ready = dict.fromkeys(ports, False)
        deadline = time.monotonic() + 120  # a bound on the wait, not a synchronisation
        while not all(ready.values()) and time.monotonic() < deadline:
            for port, proc in zip(ports, procs, strict=True):
                if proc.poll() is not None:
                    pytest.fail(f"serve on {port} exited {proc.returncode}: {proc.stdout.read()}")
                if not ready[port]:
                    with contextlib.suppress(httpx.TransportError):
                        ready[port] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            time.sleep(0.2)
        assert all(ready.values()), ready
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        if not os.environ.get("DATABASE_URL"):
            _drop_database(server_url, name)
