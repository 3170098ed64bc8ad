"""scripts/run_migrations.sh (psql only) against a real PostgreSQL, and side by side with the
Python runner: same tracking table, same checksums, same rules, same lock."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import REPO, migrate_sync

from iafactory.db import migrate

SCRIPT = REPO / "scripts" / "run_migrations.sh"

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def script_env(url: str, migrations_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["DATABASE_URL"] = url
    if migrations_dir is not None:
        env["IAFACTORY_MIGRATIONS_DIR"] = str(migrations_dir)
    return env


def run_script(url: str, *args: str, migrations_dir: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=script_env(url, migrations_dir), timeout=300)


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def recorded(url: str) -> list[tuple[str, str, str]]:
    """(version, checksum, tool) of every recorded migration."""
    if query(url, "SELECT to_regclass('public.schema_migrations') IS NULL")[0][0]:
        return []
    return query(url, "SELECT version, checksum, tool FROM schema_migrations ORDER BY version")


def python_states(url: str, migrations: list[migrate.Migration] | None = None) -> dict[str, str]:
    return {s.version: s.state for s in asyncio.run(migrate.check(url, migrations))}


def files() -> list[migrate.Migration]:
    return migrate.discover()


def verify_ok(url: str) -> bool:
    from iafactory.db import verify
    from iafactory.db.scope import admin_connect

    async def go() -> list[verify.Check]:
        async with await admin_connect(url) as conn:
            return await verify.run_checks(conn)

    checks = asyncio.run(go())
    return all(c.ok for c in checks) and len(checks) >= 7


def test_script_applies_everything_and_python_runner_agrees(empty_db: str) -> None:
    result = run_script(empty_db)
    assert result.returncode == 0, result.stderr
    for m in files():
        assert f"applying {m.filename} ... ok (" in result.stdout
    assert recorded(empty_db) == [(m.version, m.checksum, "psql") for m in files()]
    assert python_states(empty_db) == {m.version: "applied" for m in files()}
    assert verify_ok(empty_db)
    assert migrate_sync(empty_db) == []


def test_script_after_python_runner_says_up_to_date(empty_db: str) -> None:
    migrate_sync(empty_db)
    before = recorded(empty_db)
    result = run_script(empty_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Database is up to date."
    assert recorded(empty_db) == before == [(m.version, m.checksum, "iafactory") for m in files()]


def test_script_refuses_007_on_fresh_database(empty_db: str) -> None:
    result = run_script(empty_db, "007")
    assert result.returncode != 0
    assert result.stderr.startswith("error: 007 cannot run before 001")
    assert "applying" not in result.stdout
    assert recorded(empty_db) == []
    assert query(empty_db, "SELECT to_regclass('public.tenants'), to_regclass('public.users')") == [(None, None)]


def test_script_refuses_007_before_006(empty_db: str) -> None:
    for v in ("001", "002", "003", "004", "005"):
        migrate_sync(empty_db, v)
    before = recorded(empty_db)
    result = run_script(empty_db, "007")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: 007 cannot run before 006: apply 006 first (or run without an argument to apply everything in order)"]
    assert recorded(empty_db) == before
    assert query(empty_db, "SELECT to_regclass('public.tenants')") == [(None,)]


def _check_lines(stdout: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in stdout.splitlines():
        version, name, state = line.split()
        out[version] = (name, state)
    return out


def test_script_check_lists_applied_and_pending_and_applies_nothing(empty_db: str) -> None:
    for v in ("001", "002", "003"):
        migrate_sync(empty_db, v)
    before = recorded(empty_db)
    result = run_script(empty_db, "--check")
    assert result.returncode == 0, result.stderr
    assert _check_lines(result.stdout) == {
        m.version: (m.name, "applied" if m.version <= "003" else "pending") for m in files()}
    assert recorded(empty_db) == before
    assert query(empty_db, "SELECT to_regclass('public.knowledge_base'), to_regclass('public.bolt_workflows')") \
        == [("knowledge_base", None)]


def test_script_detects_an_edited_applied_migration(empty_db: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, directory)
    assert run_script(empty_db, migrations_dir=directory).returncode == 0
    edited = directory / "002_create_projects.sql"
    edited.write_text(edited.read_text().replace("DEFAULT ''", "DEFAULT 'n/a'"))
    new = f"{max(int(m.version) for m in migrate.discover(directory)) + 1:03d}"
    (directory / f"{new}_later_table.sql").write_text("CREATE TABLE later_table (id integer PRIMARY KEY);\n")
    before = recorded(empty_db)

    check = run_script(empty_db, "--check", migrations_dir=directory)
    assert check.returncode == 0, check.stderr
    states = {v: state for v, (_, state) in _check_lines(check.stdout).items()}
    assert states["002"] == "changed"
    assert states[new] == "pending"
    # The Python runner reads the same table and sees the same.
    assert python_states(empty_db, migrate.discover(directory)) == states

    result = run_script(empty_db, migrations_dir=directory)
    assert result.returncode != 0
    assert result.stderr.startswith("error: applied migration(s) changed since they ran: 002_create_projects.sql")
    assert "applying" not in result.stdout
    assert recorded(empty_db) == before
    assert query(empty_db, "SELECT to_regclass('public.later_table')") == [(None,)]


def _assert_each_version_once(url: str, by_script: list[str], by_python: list[str]) -> None:
    rows = recorded(url)
    assert [v for v, _, _ in rows] == [m.version for m in files()]
    assert [(v, c) for v, c, _ in rows] == [(m.version, m.checksum) for m in files()]
    assert sorted(by_script + by_python) == [m.version for m in files()]
    assert sorted(v for v, _, tool in rows if tool == "psql") == sorted(by_script)
    assert verify_ok(url)


def _script_applied(stdout: str) -> list[str]:
    return [line.split()[1][:3] for line in stdout.splitlines() if line.startswith("applying ")]


def test_script_and_python_runner_at_once_script_holding_the_lock(empty_db: str) -> None:
    """The script takes the lock first; the Python runner waits while the script builds
    indexes CONCURRENTLY (a waiter blocked in pg_advisory_lock would hang that build)."""
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env(empty_db))
    try:
        # The script prints its first line once it holds the lock and has applied 001.
        first = proc.stdout.readline()
        assert first.startswith("applying 001_create_users.sql ... ok"), first + proc.stderr.read()
        by_python = [m.version for m in asyncio.run(asyncio.wait_for(migrate.migrate(empty_db), 120))]
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    _assert_each_version_once(empty_db, _script_applied(first + rest), by_python)
    assert by_python == []


def test_script_and_python_runner_at_once_python_holding_the_lock(empty_db: str) -> None:
    """The Python runner takes the lock first and starts the script as it begins 001; the script
    waits for the lock while the Python runner builds indexes CONCURRENTLY."""
    procs: list[subprocess.Popen] = []

    def start_script(m: migrate.Migration) -> None:
        if not procs:
            procs.append(subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=script_env(empty_db)))

    try:
        by_python = [m.version for m in asyncio.run(
            asyncio.wait_for(migrate.migrate(empty_db, on_start=start_script), 120))]
        assert len(procs) == 1
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 0, err
    assert out.strip() == "Database is up to date."
    _assert_each_version_once(empty_db, _script_applied(out), by_python)
    assert by_python == [m.version for m in files()]
