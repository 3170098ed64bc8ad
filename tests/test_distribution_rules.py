"""The schema stays distributable by tenant (Citus), checked in the catalog of plain PostgreSQL.

CI cannot run Citus, so each rule that Citus enforces when `iafactory citus distribute` runs, or
when a request reaches a distributed table, is read here from pg_constraint, pg_index, pg_policy,
pg_proc and pg_trigger. A later migration that breaks one fails this module, naming the object.

Each rule is a function returning its violations. Every rule is tested twice: the migrated schema
has none, and a violation planted in a rolled-back transaction is found (so no rule can pass
vacuously).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import _drop_database, create_migrated_database
from sql_rules import check_sql

MIGRATIONS = Path(__file__).resolve().parent.parent / "src" / "iafactory" / "db" / "migrations"
SCHEMAS = ("app", "platform", "internal")

# Statements that read a tenant table across tenants, on purpose: {(function, table): why}.
# A write never gets here: it always names its tenant.
CROSS_TENANT_READS = {
    ("app.user_memberships", "tenant_users"): "sign-in: the tenants of one user, whichever they are",
    ("app.user_memberships", "tenants"): "sign-in: the tenants of one user, whichever they are",
    ("app.authenticate_api_key", "api_keys"): "the key's tenant is what the lookup by prefix finds",
    ("app.find_invitation", "invitations"): "the invitation's tenant is what the lookup by token hash finds",
    ("platform.tenant_list", "tenants"): "the platform's registry of tenants",
    ("platform.grant_monthly", "tenants"): "the monthly grant visits every tenant (then one at a time)",
    ("app.knowledge_job_stats", "knowledge_jobs"): "/metrics: the size of the whole queue, no tenant's figure",
    ("app.claim_knowledge_job", "knowledge_jobs"): "which tenants have runnable jobs (then a claim within one)",
    ("app.purge_idempotency_keys", "idempotency_keys"): "which tenants have expired keys (then a delete within one)",
    ("app.purge_account_records", "invitations"): "which tenants have spent invitations (then a delete within one)",
    ("platform.erasure_requests", "erasure_requests"): "the platform's list of erasure requests to confirm",
    ("platform.erasure_requests", "tenants"): "the platform's list of erasure requests: each one's tenant",
}


@pytest.fixture(scope="module")
def db(server_url: str, migrated_template: str) -> Iterator[str]:
    name, admin = create_migrated_database(server_url, migrated_template)
    try:
        yield admin
    finally:
        _drop_database(server_url, name)


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    """A connection whose transaction is rolled back: tests may plant violations in it."""
    with psycopg.connect(db) as c:
        yield c
        c.rollback()


def tenant_tables(conn: psycopg.Connection) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            """SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
             AND a.attname = 'tenant_id' AND NOT a.attisdropped"""
        )
    }


def non_immutable_functions(conn: psycopg.Connection) -> set[str]:
    """Names of functions with no IMMUTABLE variant (now, random, current_setting ...)."""
    return {
        r[0]
        for r in conn.execute(
            """SELECT p.proname FROM pg_proc p GROUP BY p.proname
           HAVING bool_and(p.provolatile <> 'i')"""
        )
    }


def functions(conn: psycopg.Connection, language: str | None = None) -> list[tuple[str, str, str]]:
    """(qualified name, language, body) of the functions and procedures of app, platform, internal."""
    return conn.execute(
        """SELECT n.nspname || '.' || p.proname, l.lanname, p.prosrc
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
           WHERE n.nspname = ANY (%s) AND (%s::text IS NULL OR l.lanname = %s)
           ORDER BY 1""",
        (list(SCHEMAS), language, language),
    ).fetchall()


# --- the rules ---------------------------------------------------------------------------------------


def keys_without_tenant(conn: psycopg.Connection) -> list[str]:
    """Every primary key and unique index of a tenant table starts with tenant_id; tenants' only
    unique index is its primary key (id). Citus enforces no other unique key."""
    rows = conn.execute(
        """SELECT c.relname, i.relname, x.indisprimary,
                  (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(x.indkey) WITH ORDINALITY k(n, i)
                   LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n)
           FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid
           WHERE x.indisunique AND c.relnamespace = 'public'::regnamespace"""
    ).fetchall()
    tables = tenant_tables(conn)
    bad = []
    for table, index, _, columns in rows:
        if table in tables and (not columns or columns[0] != "tenant_id"):
            bad.append(f"{table}: {index} on {columns} does not start with tenant_id")
        if table == "tenants" and columns != ["id"]:
            bad.append(f"tenants: {index} on {columns}: a table distributed by id cannot enforce it")
    for table in sorted(tables | {"tenants"}):
        if not any(r[0] == table and r[2] for r in rows):
            bad.append(f"{table}: no primary key")
    return bad


def foreign_keys_across_shards(conn: psycopg.Connection) -> list[str]:
    """A reference between tenant tables (or to tenants) pairs tenant_id with the referenced
    tenant_id (tenants.id): both rows then live in the same shard group."""
    rows = conn.execute(
        """SELECT c.conname, c.conrelid::regclass::text, c.confrelid::regclass::text,
                  (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n),
                  (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                   JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n)
           FROM pg_constraint c WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace"""
    ).fetchall()
    tables = tenant_tables(conn)
    bad = []
    for name, table, ref, local, remote in rows:
        if table not in tables or (ref not in tables and ref != "tenants"):
            continue
        want = "id" if ref == "tenants" else "tenant_id"
        if ("tenant_id", want) not in list(zip(local, remote, strict=True)):
            bad.append(
                f"{table}.{name}: ({', '.join(local)}) -> {ref} ({', '.join(remote)}) does not pair "
                f"tenant_id with {ref}.{want}"
            )
    return bad


def policies_with_subqueries(conn: psycopg.Connection) -> list[str]:
    """No policy holds a subquery: a shard cannot run one (Citus refuses the table)."""
    rows = conn.execute(
        """SELECT c.relname, p.polname, coalesce(p.polqual::text, '') || coalesce(p.polwithcheck::text, '')
           FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
           WHERE c.relnamespace = 'public'::regnamespace"""
    ).fetchall()
    return [f"{table}: policy {name} holds a subquery" for table, name, tree in rows if "{SUBLINK" in tree]


def tenant_policies_not_on_current_tenant(conn: psycopg.Connection) -> list[str]:
    """Each tenant table's tenant_isolation policy compares tenant_id with app.current_tenant_id()."""
    want = "(tenant_id = app.current_tenant_id())"
    rows = conn.execute(
        """SELECT c.relname, pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
           FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
           WHERE c.relnamespace = 'public'::regnamespace AND p.polname = 'tenant_isolation'"""
    ).fetchall()
    found = {r[0] for r in rows}
    bad = [f"{t}: tenant_isolation is USING {u} WITH CHECK {w}" for t, u, w in rows if (u, w) != (want, want)]
    bad += [f"{t}: no tenant_isolation policy" for t in sorted(tenant_tables(conn) - found)]
    return bad


def sql_functions_reading_tables(conn: psycopg.Connection) -> list[str]:
    """LANGUAGE sql functions read no table of public: Citus cannot plan their parameters."""
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
        )
    }
    bad = []
    for name, _, body in functions(conn, "sql"):
        used = set(re.findall(r"\bpublic\.\"?([a-z_][a-z0-9_]*)", body)) & tables
        used |= {
            m.group(1)
            for m in re.finditer(
                r"\b(?:from|join|update|into)\s+\"?([a-z_][a-z0-9_]*)\"?(?!\s*\()", body, re.IGNORECASE
            )
            if m.group(1) in tables
        }
        if used:
            bad.append(f"{name} is LANGUAGE sql and reads {', '.join(sorted(used))}: write it in plpgsql")
    return bad


def function_statements_without_tenant(conn: psycopg.Connection) -> list[str]:
    """Every statement on a tenant table inside a function names its tenant (see sql_rules)."""
    tables = tenant_tables(conn) | {"tenants"}
    non_immutable = non_immutable_functions(conn)
    bad = []
    for name, language, body in functions(conn):
        if language not in ("plpgsql", "sql"):
            continue
        allowed = {table for (fn, table) in CROSS_TENANT_READS if fn == name}
        bad += [f"{name}: {f}" for f in check_sql(body, tables, non_immutable, allowed)]
    return bad


def functions_on_row_types(conn: psycopg.Connection) -> list[str]:
    """No function takes or returns a table's row type: distributing (or converting) the table
    would drop it with CASCADE."""
    rows = conn.execute(
        """SELECT p.oid::regprocedure::text, t.typname
           FROM pg_proc p
           JOIN pg_type t ON t.oid = ANY (array_append(coalesce(p.proallargtypes, p.proargtypes::oid[]), p.prorettype))
           JOIN pg_class c ON c.oid = t.typrelid AND c.relkind IN ('r', 'p')
           WHERE c.relnamespace = 'public'::regnamespace"""
    ).fetchall()
    return [f"{sig} uses the row type of table {typ}" for sig, typ in rows]


def triggers_reading_their_table_name(conn: psycopg.Connection) -> list[str]:
    """Trigger functions never read TG_TABLE_NAME (on a shard it is the shard's name); a trigger
    whose function reads TG_ARGV passes its table's name first."""
    bad = []
    for name, _, body in functions(conn, "plpgsql"):
        for word in re.findall(r"\bTG_(?:TABLE_NAME|RELNAME|RELID)\b", body, re.IGNORECASE):
            bad.append(f"{name} reads {word}: take the table's name from TG_ARGV[0]")
    rows = conn.execute(
        """SELECT c.relname, t.tgname, n.nspname || '.' || p.proname, p.prosrc, t.tgargs
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace"""
    ).fetchall()
    for table, trigger, function, body, args in rows:
        first = bytes(args).split(b"\x00")[0].decode() if args else None
        if re.search(r"\bTG_ARGV\b", body) and first != table:
            bad.append(
                f"{table}.{trigger}: {function} reads TG_ARGV but its first argument is {first!r}, not {table!r}"
            )
    return bad


def identity_columns_not_bigint(conn: psycopg.Connection) -> list[str]:
    """Identity columns of tenant tables are bigint (Citus hands out bigint ranges per node)."""
    rows = conn.execute(
        """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           WHERE c.relnamespace = 'public'::regnamespace AND a.attidentity <> '' AND NOT a.attisdropped"""
    ).fetchall()
    tables = tenant_tables(conn)
    return [f"{t}.{col} is an identity of type {typ}" for t, col, typ in rows if t in tables and typ != "bigint"]


RULES: dict[str, Callable[[psycopg.Connection], list[str]]] = {
    "keys": keys_without_tenant,
    "foreign keys": foreign_keys_across_shards,
    "policies": policies_with_subqueries,
    "tenant policies": tenant_policies_not_on_current_tenant,
    "sql functions": sql_functions_reading_tables,
    "function statements": function_statements_without_tenant,
    "row types": functions_on_row_types,
    "trigger names": triggers_reading_their_table_name,
    "identity": identity_columns_not_bigint,
}

# One violation per rule, planted in a transaction that is rolled back.
PLANTED = {
    "keys": "ALTER TABLE crm_leads ADD CONSTRAINT crm_leads_email_key UNIQUE (email)",
    "foreign keys": "ALTER TABLE crm_deals ADD COLUMN other uuid, "
    "ADD CONSTRAINT crm_deals_other_fkey FOREIGN KEY (other) REFERENCES tenants (id)",
    "policies": "CREATE POLICY leaky ON projects FOR SELECT TO iaf_owner "
    "USING (tenant_id = (SELECT app.current_tenant_id()))",
    "tenant policies": "ALTER POLICY tenant_isolation ON projects USING (true)",
    "sql functions": "CREATE FUNCTION app.project_count(p uuid) RETURNS bigint LANGUAGE sql "
    "AS 'SELECT count(*) FROM public.projects WHERE tenant_id = p'",
    "function statements": "CREATE FUNCTION app.touch_all() RETURNS void LANGUAGE plpgsql "
    "AS $$ BEGIN UPDATE public.projects SET updated_at = now(); END $$",
    "row types": "CREATE FUNCTION platform.all_projects() RETURNS SETOF public.projects LANGUAGE plpgsql "
    "AS $$ BEGIN RETURN; END $$",
    "trigger names": "CREATE FUNCTION app.named() RETURNS trigger LANGUAGE plpgsql "
    "AS $$ BEGIN RAISE NOTICE '%', TG_ARGV[0]; RETURN NEW; END $$; "
    "CREATE TRIGGER named BEFORE INSERT ON projects FOR EACH ROW EXECUTE FUNCTION app.named('crm_leads')",
    "identity": "CREATE TABLE public.counters (tenant_id uuid NOT NULL, id integer GENERATED ALWAYS AS IDENTITY, "
    "PRIMARY KEY (tenant_id, id))",
}


@pytest.mark.parametrize("rule", list(RULES))
def test_the_migrated_schema_follows_the_rule(conn: psycopg.Connection, rule: str) -> None:
    assert RULES[rule](conn) == []


@pytest.mark.parametrize("rule", list(RULES))
def test_a_later_migration_breaking_the_rule_is_caught(conn: psycopg.Connection, rule: str) -> None:
    assert PLANTED.keys() == RULES.keys()
    conn.execute(PLANTED[rule])
    assert RULES[rule](conn), f"planted: {PLANTED[rule]}"


def test_tenant_tables_are_found(conn: psycopg.Connection) -> None:
    # Guards every rule above against a discovery that finds nothing.
    assert {"projects", "knowledge_base", "tenant_users", "api_keys", "audit_events"} <= tenant_tables(conn)


def test_the_checks_would_have_caught_what_migrations_008_to_011_did(conn: psycopg.Connection) -> None:
    """The function bodies as 008-011 wrote them break the statement rules (020 rewrote them)."""
    tables = tenant_tables(conn) | {"tenants"}
    non_immutable = non_immutable_functions(conn)
    old = "\n".join(
        (MIGRATIONS / f).read_text()
        for f in ("008_row_level_security.sql", "009_request_gate.sql", "010_plans_credits_audit.sql")
    )

    def body(function: str) -> str:
        m = re.search(rf"FUNCTION {re.escape(function)}\(.*?AS \$\$(.*?)\$\$", old, re.DOTALL)
        assert m, function
        return m.group(1)

    record_event = check_sql(body("app.record_event"), tables, non_immutable)
    assert any("INSERT INTO audit_events ... SELECT" in str(f) for f in record_event), record_event
    authorize = check_sql(body("app.authorize"), tables, non_immutable)
    assert any("tenants (t) without t.id" in str(f) for f in authorize), authorize
    assert check_sql(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = $1 AND id = $2",
        tables,
        non_immutable,
    )
    # ... and what replaced them passes.
    assert not check_sql(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
        tables,
        non_immutable,
    )


def test_the_owner_role_cannot_log_in_on_plain_postgresql(conn: psycopg.Connection) -> None:
    """Only `iafactory citus distribute` lets iaf_owner log in (between Citus nodes)."""
    assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'iaf_owner'").fetchone() == (False,)


def test_slugs_stay_unique_through_the_registry(conn: psycopg.Connection) -> None:
    """Whichever path creates a tenant (platform function, or a plain INSERT as the seed document
    does), its slug is registered, and a second tenant cannot take it."""
    assert conn.execute(
        """SELECT count(*) FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY (x.indkey)
           WHERE x.indrelid = 'tenants'::regclass AND x.indisunique AND a.attname = 'slug'"""
    ).fetchone() == (0,)
    made = conn.execute(
        "SELECT id FROM platform.tenant_create('Un', 'registre-un', 'CH', 'free', 'trial', "
        "NULL, NULL, NULL, NULL, NULL)"
    ).fetchone()[0]
    plain = conn.execute(
        "INSERT INTO tenants (name, slug, region) VALUES ('Deux', 'registre-deux', 'FR') RETURNING id"
    ).fetchone()[0]
    assert conn.execute(
        "SELECT slug, tenant FROM tenant_slugs WHERE slug LIKE 'registre-%%' ORDER BY slug"
    ).fetchall() == [("registre-deux", plain), ("registre-un", made)]
    for attempt in (
        "SELECT platform.tenant_create('Trois', 'registre-deux', 'CH', 'free', 'trial', NULL, NULL, NULL, NULL, NULL)",
        "INSERT INTO tenants (name, slug, region) VALUES ('Trois', 'registre-un', 'CH')",
        f"UPDATE tenants SET slug = 'registre-un' WHERE id = '{plain}'",
    ):
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute(attempt)


def test_the_application_opens_a_billing_account_only_without_credits(db: str) -> None:
    """020 grants INSERT on the whole row (a distributed INSERT sends every column); a trigger keeps
    010's rule that the application cannot give itself credits."""
    from conftest import settings_for
    from iafactory.db import server

    with psycopg.connect(db, autocommit=True) as conn:
        tenant = conn.execute(
            "INSERT INTO tenants (name, slug, region) VALUES ('Compte', 'compte-vide', 'DZ') RETURNING id"
        ).fetchone()[0]
    with psycopg.connect(server.app_conninfo(settings_for(db), db)) as conn:
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(tenant),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute(
                "INSERT INTO billing_accounts (tenant_id, billing_name, credit_balance) VALUES (%s, 'x', 1000)",
                (tenant,),
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("UPDATE billing_accounts SET credit_balance = 1000 WHERE tenant_id = %s", (tenant,))
        row = conn.execute(
            "INSERT INTO billing_accounts (tenant_id, billing_name, credit_balance, created_at) "
            "VALUES (%s, 'Cabinet', 0, now()) RETURNING credit_balance, currency",
            (tenant,),
        ).fetchone()
        assert row == (0, "DZD")


def test_citus_distribute_without_citus_is_one_error_line_and_changes_nothing(db: str) -> None:
    from conftest import run_cli

    with psycopg.connect(db) as conn:
        before = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'iaf_owner'").fetchone()
    result = run_cli("citus", "distribute", db_url=db, env={"IAFACTORY_OWNER_DB_PASSWORD": "x" * 32})
    assert result.returncode == 1
    assert result.stderr.startswith("error: citus is not installed") and result.stderr.count("\n") == 1, result.stderr
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'iaf_owner'").fetchone() == before
