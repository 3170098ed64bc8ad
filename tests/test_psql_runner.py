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

from conftest import REPO, migrate_sync, run_cli
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
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=script_env(url, migrations_dir), timeout=300
    )


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


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
        "error: 007 cannot run before 006: apply 006 first (or run without an argument to apply everything in order)"
    ]
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
        m.version: (m.name, "applied" if m.version <= "003" else "pending") for m in files()
    }
    assert recorded(empty_db) == before
    assert query(empty_db, "SELECT to_regclass('public.knowledge_base'), to_regclass('public.bolt_workflows')") == [
        ("knowledge_base", None)
    ]


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
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(empty_db)
    )
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
            procs.append(
                subprocess.Popen(
                    ["bash", str(SCRIPT)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=script_env(empty_db),
                )
            )

    try:
        by_python = [
            m.version for m in asyncio.run(asyncio.wait_for(migrate.migrate(empty_db, on_start=start_script), 120))
        ]
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


# --------------------------------------------------------------------------------------------
# which database: an explicit one, never psql's defaults
# --------------------------------------------------------------------------------------------


def test_script_without_database_url_or_embedded_server_refuses(tmp_path: Path) -> None:
    """A checkout without .venv (a host without Python) and no DATABASE_URL: one error line, and
    psql's defaults (PGHOST...) are not taken for a target."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "run_migrations.sh")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env.update(
        PGHOST=str(tmp_path / "no-server-here"), PGUSER="postgres", IAFACTORY_MIGRATIONS_DIR=str(migrate.MIGRATIONS_DIR)
    )
    for args in ([], ["--check"], ["001"]):
        result = subprocess.run(
            ["bash", str(tmp_path / "scripts" / "run_migrations.sh"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "error: no database: set DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres), "
            "or run scripts/demo.sh once to use the embedded server"
        ]


def test_script_without_database_url_uses_the_embedded_server_as_the_cli_does(tmp_path: Path) -> None:
    data_dir = tmp_path / "iafactory-data"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    env["IAFACTORY_DATA_DIR"] = str(data_dir)
    try:
        result = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        url = subprocess.run(
            [str(REPO / ".venv" / "bin" / "iafactory"), "db", "url"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.strip()
        assert f"DATABASE_URL is not set: using {url} (from .venv/bin/iafactory db url)" in result.stderr
        assert _check_lines(result.stdout) == {m.version: (m.name, "pending") for m in files()}
        assert recorded(url) == []
        with psycopg.connect(url) as conn:
            assert conn.execute("SHOW data_directory").fetchone()[0] == str((data_dir / "pg18").resolve())
    finally:
        subprocess.run([str(REPO / ".venv" / "bin" / "iafactory"), "db", "stop"], env=env, capture_output=True)


def test_script_check_on_a_fresh_database_writes_nothing(empty_db: str) -> None:
    result = run_script(empty_db, "--check")
    assert result.returncode == 0, result.stderr
    assert _check_lines(result.stdout) == {m.version: (m.name, "pending") for m in files()}
    assert query(empty_db, "SELECT to_regclass('public.schema_migrations')") == [(None,)]
    assert query(
        empty_db,
        """SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')""",
    ) == [(0,)]


# --------------------------------------------------------------------------------------------
# the tracking table's privileges, set by the runner that creates it
# --------------------------------------------------------------------------------------------


def _grants_on_tracking_table(url: str) -> list[tuple]:
    return query(
        url,
        """SELECT a.grantee::regrole::text, a.privilege_type
                         FROM pg_class c, aclexplode(c.relacl) a
                         WHERE c.oid = 'public.schema_migrations'::regclass AND a.grantee <> c.relowner""",
    )


@pytest.mark.parametrize("runner", ["python", "psql"])
def test_runner_creating_the_tracking_table_keeps_it_from_the_application(empty_db: str, runner: str) -> None:
    """008 cannot revoke on a table that plain psql never made; a DBA's default privileges must not
    hand it to the application (or to everyone) when a runner creates it later."""
    execute(
        empty_db,
        """DO $$ BEGIN
                         IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iaf_app') THEN
                           CREATE ROLE iaf_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
                         END IF; END $$""",
    )
    execute(empty_db, "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT ON TABLES TO PUBLIC, iaf_app")
    if runner == "python":
        assert [m.version for m in migrate_sync(empty_db, "001")] == ["001"]
    else:
        result = run_script(empty_db, "001")
        assert result.returncode == 0, result.stderr
    assert [v for v, _, _ in recorded(empty_db)] == ["001"]
    assert _grants_on_tracking_table(empty_db) == []
    # The default privileges were in force: the migration's own table got them.
    assert ("iaf_app", "SELECT") in query(
        empty_db,
        """SELECT a.grantee::regrole::text, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
                     WHERE c.oid = 'public.users'::regclass""",
    )


# --------------------------------------------------------------------------------------------
# superseded checksums: 008 as it was before it ran under plain psql
# --------------------------------------------------------------------------------------------

NEW_008_REVOKE = """\
DO $$
BEGIN
    IF to_regclass('public.schema_migrations') IS NOT NULL THEN
        REVOKE ALL ON public.schema_migrations FROM iaf_app;
    END IF;
END
$$;
"""


def old_008_text() -> str:
    """008 as databases applied it before the plain-psql fix: the current text with the old line."""
    text = (migrate.MIGRATIONS_DIR / "008_row_level_security.sql").read_text()
    start = text.index("-- The runners' tracking table is not the application's.")
    end = text.index(NEW_008_REVOKE) + len(NEW_008_REVOKE)
    return text[:start] + "REVOKE ALL ON schema_migrations FROM iaf_app;\n" + text[end:]


def migrations_with_old_008(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations-before-the-fix"
    shutil.copytree(migrate.MIGRATIONS_DIR, directory)
    (directory / "008_row_level_security.sql").write_text(old_008_text())
    return directory


def test_the_listed_old_checksum_is_the_old_008() -> None:
    import hashlib

    m008 = next(m for m in files() if m.version == "008")
    old = hashlib.sha256(old_008_text().encode()).hexdigest()
    assert old == "f803e0ef3d76d150cf19b436d99036c037f8f33e05edf7aeeb728d00071c4ce2"  # git show 70c9ddc:...008
    assert old != m008.checksum
    assert [c for c, _ in m008.superseded] == [old]


@pytest.mark.parametrize("first", ["python", "psql"])
def test_database_migrated_with_the_old_008_stays_valid_for_both_runners(
    empty_db: str, tmp_path: Path, first: str
) -> None:
    before_fix = migrations_with_old_008(tmp_path)
    if first == "python":
        migrate_sync(empty_db, migrations=migrate.discover(before_fix))
    else:
        assert run_script(empty_db, migrations_dir=before_fix).returncode == 0
    old_sum = {v: c for v, c, _ in recorded(empty_db)}["008"]
    assert old_sum != next(m.checksum for m in files() if m.version == "008")

    # Today's files: nothing "changed", nothing to do, for either runner.
    assert python_states(empty_db) == {m.version: "applied" for m in files()}
    check = run_script(empty_db, "--check")
    assert check.returncode == 0, check.stderr
    assert {v: s for v, (_, s) in _check_lines(check.stdout).items()} == {m.version: "applied" for m in files()}
    cli = run_cli("migrate", "--check", db_url=empty_db)
    assert cli.returncode == 0, cli.stderr
    assert "changed" not in cli.stdout
    assert "008_row_level_security.sql was applied as an earlier text, accepted as equivalent" in cli.stdout
    assert migrate_sync(empty_db) == []
    script = run_script(empty_db)
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == "Database is up to date."
    assert verify_ok(empty_db)
    # The record keeps what really ran.
    assert {v: c for v, c, _ in recorded(empty_db)}["008"] == old_sum


def test_a_checksum_not_listed_is_still_changed(empty_db: str, tmp_path: Path) -> None:
    """The list accepts exactly the texts it names: any other edit of 008 still blocks both runners."""
    edited = migrations_with_old_008(tmp_path)
    path = edited / "008_row_level_security.sql"
    path.write_text(path.read_text() + "\n-- one more line\n")
    migrate_sync(empty_db, migrations=migrate.discover(edited))
    assert python_states(empty_db)["008"] == "changed"
    assert {v: s for v, (_, s) in _check_lines(run_script(empty_db, "--check").stdout).items()}["008"] == "changed"
    assert run_script(empty_db).returncode != 0


def test_a_malformed_superseded_line_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, directory)
    with (directory / migrate.SUPERSEDED_FILE).open("a") as f:
        f.write("008 not-a-checksum because\n")
    with pytest.raises(migrate.MigrationError, match=r"superseded_checksums.txt, line \d+: expected"):
        migrate.discover(directory)
