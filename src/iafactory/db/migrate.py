"""A small, strict migration runner for plain SQL files.

Why our own: the maintained tools each miss something we need (dbmate and Alembic take no lock
against concurrent runs, dbmate and yoyo do not notice edited files, Flyway's dry run is paid and
its lock hangs `CREATE INDEX CONCURRENTLY`). This one is ~250 lines:

* files `NNN_name.sql` applied in order, each recorded in `schema_migrations` with its SHA-256;
* an applied file that changed is reported (`--check`) and blocks further runs: never re-run silently;
  the one exception is an earlier text listed in `migrations/superseded_checksums.txt` (a fix that
  changes nothing for a database that already ran the file), which is accepted as applied;
* a session-level advisory lock, held on its *own* connection, serialises runners without keeping
  a transaction open (a transaction would make `CREATE INDEX CONCURRENTLY` wait forever); a
  runner waiting for it polls `pg_try_advisory_lock` rather than blocking in `pg_advisory_lock`,
  whose statement holds a snapshot that the lock holder's `CREATE INDEX CONCURRENTLY` would wait for;
* a file runs in one transaction and is rolled back whole on error, unless its first line is
  `-- iafactory:no-transaction`: then each statement commits on its own (for CONCURRENTLY and for
  long backfills), every statement must be idempotent, and a failed run is finished by running
  again; invalid indexes a failed concurrent build left behind are dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import sqlparse

from iafactory.db.scope import Conn, admin_connect

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Lines `NNN <sha256 of an earlier text of NNN> <why it is equivalent>`; read by both runners.
SUPERSEDED_FILE = "superseded_checksums.txt"
NO_TRANSACTION_MARKER = "-- iafactory:no-transaction"
# Any constant shared by the Python runner and scripts/run_migrations.sh.
ADVISORY_LOCK_KEY = 7_114_614_202_512

_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

TRACKING_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version      varchar(10) PRIMARY KEY,
    name         text NOT NULL,
    checksum     char(64) NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    execution_ms integer,
    applied_by   text NOT NULL DEFAULT current_user,
    tool         text NOT NULL DEFAULT 'iafactory'
)
"""
# The tracking table is not the application's (008 revokes the same when the table exists then;
# plain `psql -f` of 008 runs without it, so the runner that creates it later does it here).
TRACKING_TABLE_PRIVILEGES_SQL = """
DO $$
BEGIN
    REVOKE ALL ON public.schema_migrations FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iaf_app') THEN
        REVOKE ALL ON public.schema_migrations FROM iaf_app;
    END IF;
END
$$
"""


class MigrationError(Exception):
    """A migration could not run. The message names the file, the statement and the cause."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    sql: str
    checksum: str
    # (checksum, reason) of earlier texts of this file that a database may have applied instead.
    superseded: tuple[tuple[str, str], ...] = ()

    def accepts(self, recorded_checksum: str) -> bool:
        return recorded_checksum == self.checksum or any(c == recorded_checksum for c, _ in self.superseded)

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(NO_TRANSACTION_MARKER)

    @property
    def filename(self) -> str:
        return self.path.name

    def statements(self) -> list[tuple[int, str]]:
        """(line number, statement) for each statement, comments-only fragments dropped.

        The comment lines sqlparse attaches in front of a statement are left out, so that the line
        number (and an error's excerpt) is that of the statement itself, not of the comment above it.
        """
        out: list[tuple[int, str]] = []
        pos = 0
        for raw in sqlparse.split(self.sql):
            stmt = _strip_leading_comments(raw)
            start = self.sql.find(stmt, pos)
            pos = start + len(stmt) if start >= 0 else pos
            if not sqlparse.format(stmt, strip_comments=True).strip().rstrip(";").strip():
                continue
            out.append((self.sql.count("\n", 0, max(start, 0)) + 1, stmt))
        return out


def _strip_leading_comments(stmt: str) -> str:
    stmt = stmt.strip()
    while True:
        if stmt.startswith("--"):
            end = stmt.find("\n")
            stmt = "" if end < 0 else stmt[end + 1 :].lstrip()
        elif stmt.startswith("/*") and "*/" in stmt:
            stmt = stmt[stmt.index("*/") + 2 :].lstrip()
        else:
            return stmt


@dataclass(frozen=True)
class MigrationStatus:
    version: str
    name: str
    state: str  # applied | pending | changed | missing (recorded, but no file)
    applied_at: datetime | None = None
    execution_ms: int | None = None
    migration: Migration | None = None
    superseded_by_reason: str | None = None  # applied as an earlier text, accepted because of this reason


def _superseded(directory: Path) -> dict[str, list[tuple[str, str]]]:
    path = directory / SUPERSEDED_FILE
    if not path.exists():
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 3 or not re.fullmatch(r"\d{3}", parts[0]) or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            raise MigrationError(f"{SUPERSEDED_FILE}, line {number}: expected `NNN <sha256> <reason>`")
        out.setdefault(parts[0], []).append((parts[1], parts[2]))
    return out


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    superseded = _superseded(directory)
    migrations: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNN_snake_case_name.sql")
        version, name = match.groups()
        if version in migrations:
            raise MigrationError(f"{path.name}: version {version} is used twice ({migrations[version].filename})")
        data = path.read_bytes()
        migrations[version] = Migration(
            version,
            name,
            path,
            data.decode("utf-8"),
            hashlib.sha256(data).hexdigest(),
            tuple(superseded.pop(version, ())),
        )
    if superseded:
        raise MigrationError(f"{SUPERSEDED_FILE} names migration(s) with no file: {', '.join(sorted(superseded))}")
    return [migrations[v] for v in sorted(migrations)]


async def _tracking_table_exists(conn: Conn) -> bool:
    row = await (await conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL AS e")).fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    return bool(row["e"])


async def _applied(conn: Conn) -> dict[str, dict]:
    if not await _tracking_table_exists(conn):
        return {}
    cur = await conn.execute(
        "SELECT version, name, checksum, applied_at, execution_ms FROM schema_migrations ORDER BY version"
    )
    return {r["version"]: r for r in await cur.fetchall()}


async def status(conn: Conn, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    migrations = discover() if migrations is None else migrations
    applied = await _applied(conn)
    rows: list[MigrationStatus] = []
    for m in migrations:
        rec = applied.pop(m.version, None)
        if rec is None:
            rows.append(MigrationStatus(m.version, m.name, "pending", migration=m))
        else:
            state = "applied" if m.accepts(rec["checksum"]) else "changed"
            reason = next((r for c, r in m.superseded if c == rec["checksum"] != m.checksum), None)
            rows.append(MigrationStatus(m.version, m.name, state, rec["applied_at"], rec["execution_ms"], m, reason))
    for version, rec in sorted(applied.items()):
        rows.append(MigrationStatus(version, rec["name"], "missing", rec["applied_at"], rec["execution_ms"]))
    return rows


def plan(statuses: list[MigrationStatus], target: str | None = None) -> list[Migration]:
    """What `migrate [target]` would run, or a MigrationError saying why it must not."""
    changed = [s for s in statuses if s.state == "changed"]
    if changed:
        names = ", ".join(f"{s.version}_{s.name}.sql" for s in changed)
        raise MigrationError(
            f"applied migration(s) changed since they ran: {names}. Restore the original file(s) "
            "and put the change in a new migration."
        )
    missing = [s for s in statuses if s.state == "missing"]
    if missing:
        names = ", ".join(s.version for s in missing)
        raise MigrationError(f"the database has migration(s) {names} that this code does not know: upgrade the code")
    pending = [s.migration for s in statuses if s.state == "pending" and s.migration is not None]
    if target is None:
        return pending
    known = {s.version: s for s in statuses}
    if target not in known:
        raise MigrationError(f"no migration {target}; known: {', '.join(sorted(known))}")
    if known[target].state == "applied":
        return []
    earlier = [m.version for m in pending if m.version < target]
    if earlier:
        raise MigrationError(
            f"{target} cannot run before {', '.join(earlier)}: apply {earlier[0]} first "
            "(or run `iafactory migrate` to apply everything in order)"
        )
    return [known[target].migration]  # type: ignore[list-item]


def _describe_failure(m: Migration, line: int, stmt: str, err: psycopg.Error) -> MigrationError:
    diag = getattr(err, "diag", None)
    message = (diag.message_primary if diag and diag.message_primary else str(err)).strip()
    detail = f" ({diag.message_detail})" if diag and diag.message_detail else ""
    if diag and diag.statement_position:
        line += stmt.count("\n", 0, int(diag.statement_position) - 1)
    first = " ".join(stmt.split())[:120]
    return MigrationError(f"{m.filename}, line {line}: {message}{detail}\n  statement: {first}")


async def _drop_invalid_indexes(conn: Conn) -> list[str]:
    cur = await conn.execute(
        """SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE NOT i.indisvalid AND n.nspname IN ('public', 'app')"""
    )
    names = [r["name"] for r in await cur.fetchall()]
    for name in names:
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    return names


async def _run_one(conn: Conn, m: Migration) -> int:
    started = time.perf_counter()
    record = "INSERT INTO schema_migrations (version, name, checksum, execution_ms) VALUES (%s, %s, %s, %s)"
    if m.transactional:
        try:
            async with conn.transaction():
                for line, stmt in m.statements():
                    try:
                        await conn.execute(stmt)
                    except psycopg.Error as err:
                        raise _describe_failure(m, line, stmt, err) from err
                elapsed = int((time.perf_counter() - started) * 1000)
                await conn.execute(record, (m.version, m.name, m.checksum, elapsed))
        except MigrationError:
            raise
        return elapsed
    for line, stmt in m.statements():
        try:
            await conn.execute(stmt)
        except psycopg.Error as err:
            failure = _describe_failure(m, line, stmt, err)
            dropped = await _drop_invalid_indexes(conn)
            if dropped:
                failure = MigrationError(f"{failure}\n  dropped invalid indexes left behind: {', '.join(dropped)}")
            raise failure from err
    elapsed = int((time.perf_counter() - started) * 1000)
    await conn.execute(record, (m.version, m.name, m.checksum, elapsed))
    return elapsed


async def _take_lock(lock: Conn) -> None:
    """Take the runners' advisory lock, waiting as long as another runner holds it.

    Not `SELECT pg_advisory_lock(...)`: while that statement waits it holds a snapshot, and
    `CREATE INDEX CONCURRENTLY` in the runner holding the lock waits for every older snapshot in
    the database. Each would wait for the other forever, and the deadlock detector cannot see it
    (the cycle goes through the client). Between two tries this session is idle, with no snapshot.
    """
    delay = 0.01
    while True:
        cur = await lock.execute("SELECT pg_try_advisory_lock(%s) AS got", (ADVISORY_LOCK_KEY,))
        row = await cur.fetchone()
        assert row is not None
        if row["got"]:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def migrate(
    conninfo: str,
    target: str | None = None,
    *,
    migrations: list[Migration] | None = None,
    on_start: Callable[[Migration], None] | None = None,
    on_done: Callable[[Migration, int], None] | None = None,
    then: Callable[[Conn], Awaitable[None]] | None = None,
) -> list[Migration]:
    """Apply pending migrations (or just `target`) under the advisory lock. Returns what ran.

    `then` runs under the same lock once the migrations are done (the application's login role:
    two runners starting together must not both try to create it)."""
    migrations = discover() if migrations is None else migrations
    lock = await admin_connect(conninfo)
    try:
        # Session-level lock on a connection that never opens a transaction: a second runner
        # waits here, then finds nothing left to do.
        await _take_lock(lock)
        async with await admin_connect(conninfo) as conn:
            await conn.execute("SET client_min_messages = warning")
            if not await _tracking_table_exists(conn):
                await conn.execute(TRACKING_TABLE_SQL)
                await conn.execute(TRACKING_TABLE_PRIVILEGES_SQL)
            todo = plan(await status(conn, migrations), target)
            for m in todo:
                if on_start:
                    on_start(m)
                elapsed = await _run_one(conn, m)
                if on_done:
                    on_done(m, elapsed)
            if then is not None:
                await then(conn)
            return todo
    finally:
        try:
            await lock.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
        finally:
            await lock.close()


async def check(conninfo: str, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    async with await admin_connect(conninfo) as conn:
        return await status(conn, migrations)
