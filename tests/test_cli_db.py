"""`iafactory db start|stop|status` on an embedded PostgreSQL of their own (in a data directory
whose path is too long for a unix socket inside it), and where the tests' own server lives."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import REPO, embedded_test_data_dir, run_cli

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): `iafactory db` on
# embedded servers of its own (its one test of the tests' server returns early with DATABASE_URL).
pytestmark = pytest.mark.server_independent

# A checkout this deep puts PGDATA/.s.PGSQL.5432 past the 107 bytes a unix socket path may have.
DEEP = ("checkouts-of-a-very-patient-developer", "iafactory-backend-with-a-long-branch-name", "nested")


@pytest.fixture
def deep_data_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path.joinpath(*DEEP, ".iafactory")
    assert len(str(data_dir / "pg18" / ".s.PGSQL.5432")) > 107
    yield data_dir
    # Whatever the test did, leave no server behind.
    run_cli("db", "stop", db_url=None, env={"IAFACTORY_DATA_DIR": str(data_dir)})


def db(data_dir: Path, *args: str):
    return run_cli("db", *args, db_url=None, env={"IAFACTORY_DATA_DIR": str(data_dir)})


def status_lines(result) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_start_status_stop_on_a_data_directory_too_deep_for_a_socket(deep_data_dir: Path) -> None:
    pgdata = str(deep_data_dir / "pg18")
    before = db(deep_data_dir, "status")
    assert before.returncode == 3, before.stderr
    assert status_lines(before)["embedded PostgreSQL"] == "not running"
    assert status_lines(before)["data directory"] == pgdata

    started = db(deep_data_dir, "start")
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert "\n" not in url and url.startswith("postgresql://")
    assert f"embedded PostgreSQL started in {pgdata}" in started.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SHOW data_directory").fetchone()[0] == pgdata
        assert conn.execute("SELECT current_database()").fetchone()[0] == "iafactory"
        conn.execute("CREATE TABLE kept (note text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")

    again = db(deep_data_dir, "start")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == url
    assert "already running" in again.stderr

    running = status_lines(db(deep_data_dir, "status"))
    assert running["embedded PostgreSQL"].startswith("running (pid ")
    assert running["URL"] == url
    assert running["version"].startswith("18.")
    assert (Path(pgdata) / "postmaster.pid").exists()

    stopped = db(deep_data_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the embedded PostgreSQL in {pgdata}"
    # pg_ctl -w returns once the postmaster has shut down and removed its pid file.
    assert not (Path(pgdata) / "postmaster.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
    after = db(deep_data_dir, "status")
    assert after.returncode == 3
    assert status_lines(after)["embedded PostgreSQL"] == "not running"
    assert status_lines(after)["version"] == "18"

    twice = db(deep_data_dir, "stop")
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout.strip() == f"the embedded PostgreSQL in {pgdata} was not running"

    # Stopped cleanly: started again, the data is there.
    restarted = db(deep_data_dir, "start")
    assert restarted.returncode == 0, restarted.stderr
    with psycopg.connect(restarted.stdout.strip()) as conn:
        assert conn.execute("SELECT note FROM kept").fetchall() == [("still here",)]


@pytest.mark.parametrize("command", ["start", "stop"])
def test_start_and_stop_refuse_when_database_url_is_set(tmp_path: Path, command: str) -> None:
    result = run_cli(
        "db", command, db_url="postgresql://postgres@127.0.0.1:1/postgres", env={"IAFACTORY_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: DATABASE_URL is set: `iafactory db {command}` only manages the embedded PostgreSQL "
        "(unset DATABASE_URL to manage it)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_status_with_database_url_names_it_without_its_password(tmp_path: Path) -> None:
    result = run_cli(
        "db",
        "status",
        db_url="postgresql://operator:s3cret@db.example:5432/iaf",
        env={"IAFACTORY_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "database: postgresql://operator:***@db.example:5432/iaf (DATABASE_URL is set: the embedded server is not used)"
    )
    assert "s3cret" not in result.stdout + result.stderr
    assert status_lines_after_first(result)["embedded PostgreSQL"] == "not running"


def status_lines_after_first(result) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in result.stdout.splitlines()[1:])


def test_the_tests_server_is_this_checkouts_own(monkeypatch: pytest.MonkeyPatch, server_url: str) -> None:
    """Two checkouts on one machine must not share (and stop, or migrate) one test server."""
    monkeypatch.delenv("IAFACTORY_TEST_DATA_DIR", raising=False)
    assert embedded_test_data_dir() == REPO / ".test-pg"
    monkeypatch.setenv("IAFACTORY_TEST_DATA_DIR", "/srv/elsewhere")
    assert embedded_test_data_dir() == Path("/srv/elsewhere")
    monkeypatch.undo()
    if os.environ.get("DATABASE_URL"):
        return  # the tests run on that server
    with psycopg.connect(server_url) as conn:
        data_directory = conn.execute("SHOW data_directory").fetchone()[0]
    assert Path(data_directory) == (embedded_test_data_dir() / "pg18").resolve()
