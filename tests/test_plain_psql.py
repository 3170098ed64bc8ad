"""Every migration file, run as-is with `psql -v ON_ERROR_STOP=1 -f FILE`, in order, on a database
that never saw a runner (as a DBA would, or a host with nothing but psql), gives the schema the
runner gives; a runner then adopts that database."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

from conftest import prepare_sync, run_cli
from iafactory.db import migrate
from test_migrations import SNAPSHOT_QUERIES, failed_checks, query, schema_snapshot

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def psql_file(url: str, path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", path, url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def summary(url: str) -> dict[str, list[tuple]]:
    """The catalog summary (tables, columns, constraints, indexes, triggers, functions, policies,
    owners and privileges) without the runners' own tracking table."""
    return {
        part: [row for row in rows if not any("schema_migrations" in str(v) for v in row)]
        for part, rows in schema_snapshot(url).items()
    }


def test_every_migration_runs_with_plain_psql_in_order_and_gives_the_runners_schema(
    make_database: Callable[[], str],
) -> None:
    plain, by_runner = make_database(), make_database()
    for m in migrate.discover():
        result = psql_file(plain, str(m.path))
        assert result.returncode == 0, f"{m.filename}: {result.stderr}"
    assert query(plain, "SELECT to_regclass('public.schema_migrations')") == [(None,)]

    prepare_sync(by_runner)
    expected, got = summary(by_runner), summary(plain)
    # The summary sees what the migrations made (so a difference would show).
    assert any(r[2] == "tenant_isolation" for r in expected["policies"])
    assert any(r[0].startswith("app.search_passages(") for r in expected["routines"])
    for part in SNAPSHOT_QUERIES:
        assert got[part] == expected[part], part

    # `verify` finds everything but a record of the migrations (psql keeps none).
    assert failed_checks(plain) == [
        "migrations applied: " + ", ".join(f"{m.version} (pending)" for m in migrate.discover())
    ]

    # A runner adopts the database: every file runs again (they are idempotent) and is recorded,
    # the application's login role (configuration, not SQL) is created; the schema is unchanged.
    migrated = run_cli("migrate", db_url=plain)
    assert migrated.returncode == 0, migrated.stderr
    assert summary(plain) == expected
    verified = run_cli("verify", db_url=plain)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "FAIL" not in verified.stdout
