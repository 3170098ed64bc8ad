"""The tenant boundary is one module. These checks fail the build if the tenant setting, a raw
connection, a pool or a commit shows up anywhere else in the application code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): a lint of the source
# code, no database.
pytestmark = pytest.mark.server_independent

SRC = Path(__file__).resolve().parent.parent / "src" / "iafactory"
SCOPE = SRC / "db" / "scope.py"
MIGRATIONS = SRC / "db" / "migrations"

# pattern → modules allowed to contain it (besides db/scope.py), with the reason
FORBIDDEN: dict[str, tuple[str, dict[str, str]]] = {
    "tenant setting": (r"app\.tenant_id|set_config\s*\(", {}),
    "raw connection": (
        r"psycopg\.(Async)?Connection\.connect|psycopg\.connect\s*\(|\.connect\s*\(\s*conninfo",
        {"db/server.py": "creates the embedded server's database before any role exists; asks its version"},
    ),
    "connection pool": (r"ConnectionPool|\._pool\b|\.connection\s*\(\s*\)", {}),
    "commit": (r"\.commit\s*\(|[\"']COMMIT[\"']", {}),
    "session-level SET": (r"[\"']\s*SET\s+(?!LOCAL)(app\.|ROLE|SESSION)", {}),
}


def python_sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != SCOPE)


def test_the_scope_module_exists_and_is_the_one_that_sets_the_tenant() -> None:
    text = SCOPE.read_text()
    assert "SET LOCAL" in text and '_setting("app.tenant_id"' in text
    assert "set_config(" not in text, "SET LOCAL reaches Citus shards; set_config does not"
    assert not re.search(r"[\"']SET app\.", text), "never a session-level SET on a pooled connection"


def test_the_scope_module_keeps_no_server_session_state_and_sends_one_statement_per_message() -> None:
    """Behind a transaction pooler a statement prepared with SQL is gone (or another client's) in
    the next transaction; with Citus, a SET LOCAL sharing a simple-query message with other
    statements makes the workers run those too. tests/test_pooling.py checks the wire itself."""
    text = SCOPE.read_text()
    assert not re.search(
        r"[\"'](PREPARE|EXECUTE|LISTEN|UNLISTEN|DISCARD|RESET)\s", text.replace("LISTEN {channel}", "")
    ), "no SQL-level PREPARE/EXECUTE, no session commands on the pool"
    assert not re.search(r"[\"'];\s*(\\n)?[\"']\s*\.join", text), "no statements joined into one message"
    assert "send_query(" not in text, "no simple-query messages: each statement is Parse/Bind/Execute of its own"
    assert "LISTEN {channel}" in text and re.search(r"connect\(\s*self\.direct_conninfo", text), (
        "LISTEN on a direct connection"
    )


def test_nothing_outside_the_scope_module_touches_tenant_setting_connections_or_commits() -> None:
    offences = []
    for path in python_sources():
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text()
        for what, (pattern, allowed) in FORBIDDEN.items():
            if rel in allowed:
                continue
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                offences.append(f"{rel}:{line}: {what}: {m.group(0)!r}")
    assert not offences, "only iafactory/db/scope.py may do this:\n" + "\n".join(offences)


def test_sql_reads_the_tenant_only_through_app_current_tenant_id() -> None:
    uses = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for m in re.finditer(r".*app\.tenant_id.*", path.read_text()):
            uses.append(f"{path.name}: {m.group(0).strip()}")
    assert len(uses) == 1 and "nullif(current_setting('app.tenant_id', true), '')" in uses[0], uses


def test_the_lint_itself_catches_an_offence(tmp_path: Path) -> None:
    # A lint that cannot fail proves nothing: run the patterns on known-bad snippets.
    bad = {
        "tenant setting": "await conn.execute(\"SELECT set_config('app.tenant_id', %s, false)\")",
        "raw connection": "conn = await psycopg.AsyncConnection.connect(url)",
        "connection pool": "async with self._pool.connection() as conn:",
        "commit": "await conn.commit()",
        "session-level SET": 'await conn.execute("SET app.user_id = 1")',
    }
    for what, snippet in bad.items():
        assert re.search(FORBIDDEN[what][0], snippet), what
