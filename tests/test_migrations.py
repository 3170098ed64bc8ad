"""The SQL migrations and their runner, against a real PostgreSQL (embedded 18, or DATABASE_URL).

Each test owns its database (created and dropped by the fixtures), except the CHECK-constraint
tests, which share one migrated database and roll every statement back.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import migrate_sync, run_cli
from iafactory.db import migrate, server, verify
from iafactory.db.scope import admin_connect

DEFAULT_TENANT = "00000000-0000-0000-0000-000000000000"
LEGACY_TABLES = ("projects", "knowledge_base", "bolt_workflows", "bmad_workflows", "orchestrator_state")
PHASE1 = ["001", "002", "003", "004", "005", "006", "007"]

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def all_versions() -> list[str]:
    return [m.version for m in migrate.discover()]


def apply_one_by_one(url: str, last: str) -> None:
    """Apply 001..last, one `migrate(url, version)` call each, as an operator would."""
    for m in migrate.discover():
        if m.version > last:
            break
        assert [x.version for x in migrate_sync(url, m.version)] == [m.version]


def run_checks(url: str) -> list[verify.Check]:
    async def go() -> list[verify.Check]:
        async with await admin_connect(url) as conn:
            return await verify.run_checks(conn)

    return asyncio.run(go())


def failed_checks(url: str) -> list[str]:
    return [f"{c.name}: {c.detail}" for c in run_checks(url) if not c.ok]


def check_states(url: str, migrations: list[migrate.Migration] | None = None) -> dict[str, str]:
    return {s.version: s.state for s in asyncio.run(migrate.check(url, migrations))}


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def recorded_versions(url: str) -> list[str]:
    if query(url, "SELECT to_regclass('public.schema_migrations') IS NULL")[0][0]:
        return []
    return [r[0] for r in query(url, "SELECT version FROM schema_migrations ORDER BY version")]


def table_exists(url: str, name: str) -> bool:
    return query(url, "SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0]


_USER_SCHEMAS = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
)
SNAPSHOT_QUERIES = {
    "schemas": f"""SELECT n.nspname, n.nspowner::regrole::text, n.nspacl::text
                   FROM pg_namespace n WHERE {_USER_SCHEMAS} ORDER BY 1""",
    "relations": f"""SELECT n.nspname, c.relname, c.relkind, c.relowner::regrole::text, c.relacl::text,
                            c.relrowsecurity, c.relforcerowsecurity
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE {_USER_SCHEMAS} ORDER BY 1, 2""",
    "columns": f"""SELECT c.oid::regclass::text, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                          pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attacl::text
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                   WHERE {_USER_SCHEMAS} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                     AND a.attnum > 0 AND NOT a.attisdropped
                   ORDER BY 1, 2""",
    "constraints": f"""SELECT k.conrelid::regclass::text, k.conname, k.contype, pg_get_constraintdef(k.oid),
                              k.convalidated
                       FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
                       WHERE {_USER_SCHEMAS} ORDER BY 1, 2, 4""",
    "indexes": f"""SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready
                   FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE {_USER_SCHEMAS} ORDER BY 1""",
    "triggers": f"""SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled
                    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE {_USER_SCHEMAS} AND NOT t.tgisinternal ORDER BY 1, 2""",
    "routines": f"""SELECT p.oid::regprocedure::text, p.prokind,
                           CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END,
                           p.proowner::regrole::text, p.proacl::text
                    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE {_USER_SCHEMAS} ORDER BY 1""",
    "policies": """SELECT schemaname, tablename, policyname, permissive, roles::text, cmd, qual, with_check
                   FROM pg_policies ORDER BY 1, 2, 3""",
}


def schema_snapshot(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in SNAPSHOT_QUERIES.items()}


def data_snapshot(url: str) -> dict[str, str]:
    """Every row of every user table, as text (the admin role is a superuser: RLS does not hide rows)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                f"""SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE {_USER_SCHEMAS} AND c.relkind IN ('r', 'p') ORDER BY 1"""
            )
        ]
        return {
            t: conn.execute(f"SELECT coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '') FROM {t} x").fetchone()[
                0
            ]
            for t in tables
        }


def copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, target)
    return target


def next_version(directory: Path) -> str:
    return f"{max(int(m.version) for m in migrate.discover(directory)) + 1:03d}"


def migrate_dir(url: str, directory: Path, target: str | None = None) -> list[str]:
    return [m.version for m in migrate_sync(url, target, migrations=migrate.discover(directory))]


@pytest.fixture(scope="module")
def shared_migrated_db(server_url: str) -> Iterator[str]:
    """One migrated database for tests that roll back everything they write."""
    name = f"iaf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.with_database(server_url, name)
    try:
        migrate_sync(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------
# fresh install, upgrade, idempotence
# --------------------------------------------------------------------------------------------


def test_fresh_database_migrates_and_verifies_and_second_run_applies_nothing(empty_db: str) -> None:
    applied = [m.version for m in migrate_sync(empty_db)]
    assert applied == all_versions()
    assert applied[: len(PHASE1)] == PHASE1
    checks = run_checks(empty_db)
    assert len(checks) >= 7
    assert failed_checks(empty_db) == []

    assert migrate_sync(empty_db) == []
    assert recorded_versions(empty_db) == all_versions()


def _seed_single_tenant_install(url: str) -> None:
    """Rows as the single-tenant application (001..005) would have written them."""
    with psycopg.connect(url) as conn:
        users = [
            r[0]
            for r in conn.execute(
                """INSERT INTO users (email, name, password_hash, is_platform_admin) VALUES
                   ('amina.benali@ecole-ibn-khaldoun.dz', 'Amina Benali', '$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA', true),
                   ('jean.dupont@cabinet-dupont.ch', 'Dr. Jean Dupont', NULL, false),
                   ('lea.martin@etude-martin.ch', 'Léa Martin', NULL, false)
               RETURNING id"""
            ).fetchall()
        ]
        projects = [
            r[0]
            for r in conn.execute(
                """INSERT INTO projects (name, description, status, settings, owner_id) VALUES
                   ('Assistant juridique', 'RAG sur le droit des obligations', 'active',
                    '{"model": "mistral-large", "temperature": 0.2}', %s),
                   ('Chatbot scolaire', 'Questions des parents d''élèves', 'archived', '{}', %s),
                   ('Orphelin', '', 'active', '{}', NULL)
               RETURNING id""",
                (users[2], users[0]),
            ).fetchall()
        ]
        conn.execute(
            """INSERT INTO knowledge_base (title, content, source, language, metadata)
               SELECT 'Document ' || i, repeat('Contenu du document ' || i || '. ', 20),
                      'https://docs.example.ch/kb/' || i, (ARRAY['fr', 'de', 'ar'])[1 + i % 3],
                      jsonb_build_object('chunk', i, 'tags', jsonb_build_array('rag', 'v1'))
               FROM generate_series(1, 60) AS i"""
        )
        conn.execute(
            """INSERT INTO bolt_workflows (project_id, name, prompt, status, definition, result) VALUES
                   (%s, 'Générer contrat', 'Rédige un contrat de bail', 'completed', '{"steps": 3}', '{"ok": true}'),
                   (%s, 'Relecture', 'Relis la clause 4', 'running', '{"steps": 1}', NULL),
                   (%s, 'Quiz', 'Crée un quiz de maths', 'draft', '{}', NULL),
                   (NULL, 'Brouillon sans projet', '', 'draft', '{}', NULL)""",
            (projects[0], projects[0], projects[1]),
        )
        conn.execute(
            """INSERT INTO bmad_workflows (project_id, name, phase, status, agents, artifacts) VALUES
                   (%s, 'Analyse PME', 'analysis', 'queued', '["analyst", "pm"]', '{}'),
                   (%s, 'Architecture', 'solutioning', 'completed', '["architect"]', '{"doc": "arch.md"}')""",
            (projects[0], projects[1]),
        )
        conn.execute(
            """INSERT INTO orchestrator_state (session_key, agent, status, state, last_step)
               SELECT 'session-' || i, (ARRAY['router', 'rag', 'voice'])[1 + i % 3],
                      (ARRAY['idle', 'running', 'waiting', 'completed', 'failed'])[1 + i % 5],
                      jsonb_build_object('step', i), i
               FROM generate_series(1, 7) AS i"""
        )


def _legacy_rows_without_tenant(url: str) -> dict[str, list]:
    out = {}
    for table in LEGACY_TABLES:
        out[table] = [r[0] for r in query(url, f"SELECT to_jsonb(t) - 'tenant_id' FROM {table} t ORDER BY id")]
    return out


def test_upgrade_from_single_tenant_install_assigns_every_row_to_system_default(empty_db: str) -> None:
    apply_one_by_one(empty_db, "005")
    assert recorded_versions(empty_db) == ["001", "002", "003", "004", "005"]
    _seed_single_tenant_install(empty_db)
    before = _legacy_rows_without_tenant(empty_db)
    assert {t: len(rows) for t, rows in before.items()} == {
        "projects": 3,
        "knowledge_base": 60,
        "bolt_workflows": 4,
        "bmad_workflows": 2,
        "orchestrator_state": 7,
    }

    applied = [m.version for m in migrate_sync(empty_db)]
    assert applied == [v for v in all_versions() if v > "005"]

    # Every old row belongs to system-default, and no other column changed.
    for table in LEGACY_TABLES:
        total, on_default = query(
            empty_db, f"SELECT count(*), count(*) FILTER (WHERE tenant_id = %s) FROM {table}", (DEFAULT_TENANT,)
        )[0]
        assert (table, on_default) == (table, total)
    after = _legacy_rows_without_tenant(empty_db)
    # Columns added by later migrations (e.g. indexing state) aside, every value is unchanged.
    assert {
        t: [{k: row[k] for k in old} for row, old in zip(after[t], before[t], strict=True)] for t in before
    } == before
    assert {t: len(rows) for t, rows in after.items()} == {t: len(rows) for t, rows in before.items()}

    # No NULL tenant_id in any table that has the column (found in the catalog, not listed).
    tenant_tables = [
        r[0]
        for r in query(
            empty_db,
            """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p') ORDER BY 1""",
        )
    ]
    assert set(LEGACY_TABLES) <= set(tenant_tables)
    nulls = {t: query(empty_db, f"SELECT count(*) FROM {t} WHERE tenant_id IS NULL")[0][0] for t in tenant_tables}
    assert nulls == dict.fromkeys(tenant_tables, 0)

    assert failed_checks(empty_db) == []


def test_012_gives_untouched_accounts_their_regions_currency_and_keeps_those_with_a_ledger(empty_db: str) -> None:
    apply_one_by_one(empty_db, "011")
    tenants = {}
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for slug, region in (("dz-new", "DZ"), ("fr-used", "FR"), ("ca-set", "CA"), ("ch-new", "CH")):
            tenants[slug] = conn.execute(
                "INSERT INTO tenants (name, slug, region, status) VALUES (%s, %s, %s, 'active') RETURNING id",
                (slug, slug, region),
            ).fetchone()[0]
        # Before 012 every account took 'CHF', whatever the region.
        conn.execute(
            "INSERT INTO billing_accounts (tenant_id) VALUES (%s), (%s)", (tenants["dz-new"], tenants["ch-new"])
        )
        conn.execute("INSERT INTO billing_accounts (tenant_id, currency) VALUES (%s, 'CAD')", (tenants["ca-set"],))
        conn.execute("SELECT platform.grant_credits(%s, 50, 'start', 'start')", (tenants["fr-used"],))
    currencies = "SELECT t.slug, a.currency FROM billing_accounts a JOIN tenants t ON t.id = a.tenant_id ORDER BY 1"
    assert query(empty_db, currencies) == [("ca-set", "CAD"), ("ch-new", "CHF"), ("dz-new", "CHF"), ("fr-used", "CHF")]
    assert [m.version for m in migrate_sync(empty_db, "012")] == ["012"]
    # The FR account has ledger rows in CHF: its currency stays what its history is in.
    assert query(empty_db, currencies) == [("ca-set", "CAD"), ("ch-new", "CHF"), ("dz-new", "DZD"), ("fr-used", "CHF")]


def _project_references(url: str) -> dict[str, list[tuple]]:
    rows = query(
        url,
        """
        SELECT k.conrelid::regclass::text, k.convalidated,
               array(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
                     JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o),
               array(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY u(n, o)
                     JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.o)
        FROM pg_constraint k
        WHERE k.contype = 'f' AND k.confrelid = 'public.projects'::regclass
        ORDER BY 1""",
    )
    out: dict[str, list[tuple]] = {}
    for table, validated, cols, refcols in rows:
        out.setdefault(table, []).append((validated, cols, refcols))
    return out


def test_upgrade_makes_workflow_to_project_reference_include_tenant_id(empty_db: str) -> None:
    apply_one_by_one(empty_db, "005")
    _seed_single_tenant_install(empty_db)
    assert _project_references(empty_db) == {
        "bolt_workflows": [(True, ["project_id"], ["id"])],
        "bmad_workflows": [(True, ["project_id"], ["id"])],
    }
    migrate_sync(empty_db)
    assert _project_references(empty_db) == {
        "bolt_workflows": [(True, ["tenant_id", "project_id"], ["tenant_id", "id"])],
        "bmad_workflows": [(True, ["tenant_id", "project_id"], ["tenant_id", "id"])],
    }
    # And it bites: a workflow of another tenant cannot point at a system-default project.
    with psycopg.connect(empty_db) as conn:
        other = conn.execute(
            "INSERT INTO tenants (name, slug, region) VALUES ('Autre', 'autre', 'FR') RETURNING id"
        ).fetchone()[0]
        project = conn.execute("SELECT id FROM projects WHERE tenant_id = %s LIMIT 1", (DEFAULT_TENANT,)).fetchone()[0]
        for table in ("bolt_workflows", "bmad_workflows"):
            with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
                conn.execute(
                    f"INSERT INTO {table} (tenant_id, project_id, name) VALUES (%s, %s, 'x')", (other, project)
                )


def test_every_migration_file_applied_twice_changes_nothing(empty_db: str) -> None:
    migrate_sync(empty_db)
    with psycopg.connect(empty_db) as conn:
        conn.execute("INSERT INTO users (email, name) VALUES ('sara@example.dz', 'Sara')")
        conn.execute("INSERT INTO tenants (name, slug, region, plan) VALUES ('Étude', 'etude', 'CH', 'pro')")
        conn.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'Projet')", (DEFAULT_TENANT,))
        conn.execute(
            "INSERT INTO knowledge_base (tenant_id, title) SELECT %s, 'Doc ' || i FROM generate_series(1, 5) i",
            (DEFAULT_TENANT,),
        )
    schema_before, data_before = schema_snapshot(empty_db), data_snapshot(empty_db)
    # The snapshot sees what the migrations made (so a difference would show).
    assert any(r[0] == "tenant_slugs_pkey" for r in schema_before["indexes"])
    assert any(r[0] == "app.run_ddl_briefly(text,integer)" for r in schema_before["routines"])
    assert any(r[1] == "idx_knowledge_base_tenant_created" for r in schema_before["relations"])

    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        for m in migrate.discover():
            for line, statement in m.statements():
                try:
                    conn.execute(statement)
                except psycopg.Error as err:
                    pytest.fail(f"{m.filename}, line {line}: not idempotent: {err}")

    schema_after = schema_snapshot(empty_db)
    for part in SNAPSHOT_QUERIES:
        assert schema_after[part] == schema_before[part], part
    assert data_snapshot(empty_db) == data_before


# --------------------------------------------------------------------------------------------
# the runner: concurrency, checksums, failures, order
# --------------------------------------------------------------------------------------------


def test_two_runners_at_once_apply_each_migration_exactly_once(empty_db: str) -> None:
    async def both() -> list[list[migrate.Migration]]:
        # wait_for turns a deadlock between the runners into a failure instead of a hung suite.
        return await asyncio.wait_for(asyncio.gather(migrate.migrate(empty_db), migrate.migrate(empty_db)), 120)

    first, second = asyncio.run(both())
    versions = [m.version for m in first] + [m.version for m in second]
    assert sorted(versions) == all_versions()
    # The lock serialises them: one did everything, the other found nothing left to do.
    assert sorted([len(first), len(second)]) == [0, len(all_versions())]
    counts = query(empty_db, "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version")
    assert counts == [(v, 1) for v in all_versions()]
    assert failed_checks(empty_db) == []


def test_edited_applied_migration_is_reported_and_blocks_every_run(empty_db: str, tmp_path: Path) -> None:
    directory = copy_migrations(tmp_path)
    migrate_dir(empty_db, directory)
    edited = directory / "003_create_knowledge_base.sql"
    edited.write_text(edited.read_text() + "\nCREATE INDEX IF NOT EXISTS kb_title ON knowledge_base (title);\n")
    new = next_version(directory)
    (directory / f"{new}_later_table.sql").write_text("CREATE TABLE later_table (id integer PRIMARY KEY);\n")
    recorded = recorded_versions(empty_db)

    states = check_states(empty_db, migrate.discover(directory))
    assert states["003"] == "changed"
    assert states[new] == "pending"
    assert {v: s for v, s in states.items() if v not in ("003", new)} == {v: "applied" for v in recorded if v != "003"}

    with pytest.raises(migrate.MigrationError) as err:
        migrate_dir(empty_db, directory)
    assert "003_create_knowledge_base.sql" in str(err.value)
    assert "changed" in str(err.value)
    assert not table_exists(empty_db, "later_table")
    assert recorded_versions(empty_db) == recorded
    with pytest.raises(migrate.MigrationError, match=re.escape("003_create_knowledge_base.sql")):
        migrate_dir(empty_db, directory, new)
    assert not table_exists(empty_db, "later_table")


BAD_TRANSACTIONAL = """\
-- {v}: creates a table, fills it, then fails on line 7.
CREATE TABLE bad_probe (id integer PRIMARY KEY, label text NOT NULL);
INSERT INTO bad_probe (id, label) VALUES (1, 'un'), (2, 'deux');

-- The error is on the second line of this statement.
INSERT INTO bad_probe (id, label)
SELECT id + 10, {column} FROM bad_probe;
"""


def test_failing_transactional_migration_rolls_back_whole_and_names_file_line_statement(
    empty_db: str, tmp_path: Path
) -> None:
    directory = copy_migrations(tmp_path)
    migrate_dir(empty_db, directory)
    v = next_version(directory)
    bad = directory / f"{v}_bad.sql"
    bad.write_text(BAD_TRANSACTIONAL.format(v=v, column="no_such_column"))
    recorded = recorded_versions(empty_db)

    with pytest.raises(migrate.MigrationError) as err:
        migrate_dir(empty_db, directory)
    message = str(err.value)
    assert f"{v}_bad.sql, line 7:" in message
    assert 'column "no_such_column" does not exist' in message
    assert "statement: INSERT INTO bad_probe (id, label) SELECT id + 10, no_such_column FROM bad_probe" in message
    assert not table_exists(empty_db, "bad_probe")
    assert recorded_versions(empty_db) == recorded

    bad.write_text(BAD_TRANSACTIONAL.format(v=v, column="label || ' bis'"))
    assert migrate_dir(empty_db, directory) == [v]
    assert query(empty_db, "SELECT count(*) FROM bad_probe")[0][0] == 4
    assert recorded_versions(empty_db) == [*recorded, v]


BAD_CONCURRENT = """\
-- iafactory:no-transaction
-- {v}: a unique index on data that is not unique.
CREATE TABLE IF NOT EXISTS dup_probe (id integer PRIMARY KEY, code text NOT NULL);
INSERT INTO dup_probe (id, code) VALUES (1, 'same'), (2, 'same') ON CONFLICT (id) DO NOTHING;
{fix}
-- Codes are unique. (This comment is not the statement: the error names line 7.)
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS dup_probe_code_key ON dup_probe (code);
"""


def test_failing_concurrent_index_leaves_no_invalid_index_behind(empty_db: str, tmp_path: Path) -> None:
    directory = copy_migrations(tmp_path)
    migrate_dir(empty_db, directory)
    v = next_version(directory)
    bad = directory / f"{v}_unique_code.sql"
    bad.write_text(BAD_CONCURRENT.format(v=v, fix=""))

    with pytest.raises(migrate.MigrationError) as err:
        migrate_dir(empty_db, directory)
    message = str(err.value)
    assert f"{v}_unique_code.sql, line 7:" in message
    assert "could not create unique index" in message
    assert "statement: CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS dup_probe_code_key" in message
    assert "dup_probe_code_key" in message
    assert not table_exists(empty_db, "public.dup_probe_code_key")
    assert query(empty_db, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")[0][0] == 0
    assert v not in recorded_versions(empty_db)

    # Statements before the failure committed (no transaction); fixing the file and running
    # again finishes the job.
    bad.write_text(BAD_CONCURRENT.format(v=v, fix="DELETE FROM dup_probe WHERE id = 2;"))
    assert migrate_dir(empty_db, directory) == [v]
    assert query(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'dup_probe_code_key'::regclass") == [
        (True,)
    ]


def test_007_before_006_is_refused_and_changes_nothing(empty_db: str) -> None:
    apply_one_by_one(empty_db, "005")
    before = schema_snapshot(empty_db), data_snapshot(empty_db)

    with pytest.raises(migrate.MigrationError) as err:
        migrate_sync(empty_db, "007")
    assert "007 cannot run before 006" in str(err.value)
    assert "apply 006 first" in str(err.value)
    assert (schema_snapshot(empty_db), data_snapshot(empty_db)) == before


def test_cli_migrate_007_before_006_exits_non_zero_with_one_error_line(empty_db: str) -> None:
    apply_one_by_one(empty_db, "005")
    before = schema_snapshot(empty_db), data_snapshot(empty_db)

    result = run_cli("migrate", "007", db_url=empty_db)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: 007 cannot run before 006")
    assert "applying" not in result.stdout
    assert (schema_snapshot(empty_db), data_snapshot(empty_db)) == before


# --------------------------------------------------------------------------------------------
# what the schema enforces
# --------------------------------------------------------------------------------------------

TENANT_INSERT = "INSERT INTO tenants (name, slug, region, plan, status) VALUES (%s, %s, %s, %s, %s)"


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        (("Antenne US", "antenne-us", "US", "free", "trial"), "tenants_region_valid"),
        (("Antenne", "antenne-ch", "ch", "free", "trial"), "tenants_region_valid"),
        (("Plan or", "plan-or", "CH", "gold", "trial"), "tenants_plan_valid"),
        (("Statut", "statut", "CH", "free", "deleted"), "tenants_status_valid"),
        (("Slug", "Cabinet-Dupont", "CH", "free", "trial"), "tenants_slug_format"),
        (("Slug", "cabinet_dupont", "CH", "free", "trial"), "tenants_slug_format"),
        (("Slug", "cabinet--dupont", "CH", "free", "trial"), "tenants_slug_format"),
        (("Slug", "-cabinet", "CH", "free", "trial"), "tenants_slug_format"),
        (("Slug", "école", "CH", "free", "trial"), "tenants_slug_format"),
    ],
)
def test_tenant_check_constraints_reject_bad_values(shared_migrated_db: str, values: tuple, constraint: str) -> None:
    with psycopg.connect(shared_migrated_db) as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(TENANT_INSERT, values)
        assert err.value.diag.constraint_name == constraint
        conn.rollback()
        # The same row with the offending field fixed is accepted (the test is not vacuous).
        good = ("Ok", "ok-tenant", "CH", "free", "trial")
        fixed = tuple(
            g
            if i
            == {
                "tenants_region_valid": 2,
                "tenants_plan_valid": 3,
                "tenants_status_valid": 4,
                "tenants_slug_format": 1,
            }[constraint]
            else v
            for i, (v, g) in enumerate(zip(values, good, strict=True))
        )
        conn.execute(TENANT_INSERT, fixed)
        conn.rollback()


def test_tenant_slug_is_unique(shared_migrated_db: str) -> None:
    with psycopg.connect(shared_migrated_db) as conn:
        conn.execute(TENANT_INSERT, ("Cabinet A", "cabinet-dupont", "CH", "pro", "active"))
        with pytest.raises(psycopg.errors.UniqueViolation) as err:
            conn.execute(TENANT_INSERT, ("Cabinet B", "cabinet-dupont", "FR", "free", "trial"))
        # Unique through the slug registry (020), not an index on tenants (which Citus distributes by id).
        assert err.value.diag.constraint_name == "tenant_slugs_pkey"
        conn.rollback()


# Copied from the Phase 1 design document (seed 000), "Créer Vos Premiers Tenants" and "Lier un
# Utilisateur à un Tenant". The stored copy of that document is mojibake (its UTF-8 was read as
# Mac Roman once: "√âcole" for "École"); the statements are otherwise verbatim.
SEED_TENANT_INSERTS = [
    """INSERT INTO tenants (name, slug, region, plan, status, admin_email, metadata)
VALUES (
    'École Ibn Khaldoun Alger',
    'ecole-ibn-khaldoun-alger',
    'DZ',
    'pro',
    'active',
    'admin@ecole-ibn-khaldoun.dz',
    '{"type": "school", "students_count": 500, "city": "Alger"}'::jsonb
)
RETURNING id, slug;""",
    """INSERT INTO tenants (name, slug, region, plan, status, admin_email, metadata)
VALUES (
    'Cabinet Dr. Dupont Genève',
    'cabinet-dupont-geneve',
    'CH',
    'enterprise',
    'active',
    'admin@cabinet-dupont.ch',
    '{"type": "medical", "speciality": "general", "city": "Genève"}'::jsonb
)
RETURNING id, slug;""",
    """INSERT INTO tenants (name, slug, region, plan, status, admin_email, metadata)
VALUES (
    'Étude Maître Martin Lausanne',
    'etude-martin-lausanne',
    'CH',
    'pro',
    'active',
    'contact@etude-martin.ch',
    '{"type": "legal", "speciality": "business_law", "city": "Lausanne"}'::jsonb
)
RETURNING id, slug;""",
    """INSERT INTO tenants (name, slug, region, plan, status, admin_email, metadata)
VALUES (
    'Fiduciaire Bernard Zurich',
    'fiduciaire-bernard-zurich',
    'CH',
    'enterprise',
    'active',
    'info@fiduciaire-bernard.ch',
    '{"type": "accounting", "clients_count": 120, "city": "Zurich"}'::jsonb
)
RETURNING id, slug;""",
]
SEED_TENANT_USER_INSERT = """INSERT INTO tenant_users (tenant_id, user_id, role)
VALUES (
    (SELECT id FROM tenants WHERE slug = 'ecole-ibn-khaldoun-alger'),
    1,  -- ID de l'utilisateur
    'admin'
);"""


def test_seed_document_tenant_and_membership_inserts_work(migrated_db: str) -> None:
    with psycopg.connect(migrated_db) as conn:
        returned = [conn.execute(sql).fetchone() for sql in SEED_TENANT_INSERTS]
        assert [slug for _, slug in returned] == [
            "ecole-ibn-khaldoun-alger",
            "cabinet-dupont-geneve",
            "etude-martin-lausanne",
            "fiduciaire-bernard-zurich",
        ]
        assert all(isinstance(tenant_id, uuid.UUID) for tenant_id, _ in returned)
        rows = conn.execute(
            "SELECT name, region, plan, status, metadata FROM tenants WHERE slug = 'cabinet-dupont-geneve'"
        ).fetchall()
        assert rows == [
            (
                "Cabinet Dr. Dupont Genève",
                "CH",
                "enterprise",
                "active",
                {"type": "medical", "speciality": "general", "city": "Genève"},
            )
        ]
        assert conn.execute("SELECT count(*) FROM tenants WHERE region = 'CH'").fetchone()[0] == 4  # + system-default

        # The document links user 1; make sure that user exists, then run its statement as written.
        conn.execute(
            "INSERT INTO users (id, email, name) VALUES (1, 'directeur@ecole-ibn-khaldoun.dz', 'Karim Haddad')"
        )
        conn.execute(SEED_TENANT_USER_INSERT)
        assert conn.execute(
            "SELECT t.slug, tu.user_id, tu.role FROM tenant_users tu JOIN tenants t ON t.id = tu.tenant_id"
        ).fetchall() == [("ecole-ibn-khaldoun-alger", 1, "admin")]


# --------------------------------------------------------------------------------------------
# dry run and check change nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--dry-run", "--check"])
def test_cli_dry_run_and_check_list_pending_and_change_nothing(empty_db: str, flag: str) -> None:
    before = schema_snapshot(empty_db)
    result = run_cli("migrate", flag, db_url=empty_db)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    for m in migrate.discover():
        if flag == "--dry-run":
            assert any(line.startswith(f"would apply {m.filename}:") for line in lines), result.stdout
        else:
            assert any(m.version in line and m.name in line and "pending" in line for line in lines), result.stdout
    # Nothing was created: not even the tracking table.
    assert schema_snapshot(empty_db) == before
    assert not table_exists(empty_db, "public.schema_migrations")
    assert (
        query(
            empty_db,
            """SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')""",
        )[0][0]
        == 0
    )
