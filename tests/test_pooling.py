"""The tenant boundary keeps no server-session state, so it works behind a transaction pooler.

PgBouncer in transaction mode (Debian's 1.18 tracks no prepared statements) gives each transaction
whichever server connection is free. A boundary that prepares a statement once per client
connection, sets something for the session or LISTENs through the pool breaks there, or leaks.
These tests run the real boundary through a real PgBouncer with fewer server connections than the
service has client connections, look at the server session a request leaves behind, and read the
protocol messages the boundary sends (libpq's own trace).
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from conftest import PGBOUNCER_POOL_SIZE, TEST_SECRETS, pooler, settings_for
from iafactory.db import bootstrap, server
from iafactory.db.scope import Database
from iafactory.plans import ratelimit
from iafactory.tenancy.context import TenantContext

pytestmark = pytest.mark.anyio

needs_pgbouncer = pytest.mark.skipif(
    __import__("pgbouncer").binary() is None, reason="pgbouncer is not installed (apt-get install pgbouncer)"
)

GATE_READ = ("SELECT app.authorize(%s, %s)", ("viewer", False))
GATE_WRITE = ("SELECT app.authorize(%s, %s)", ("member", True))


def members(admin_url: str, n: int) -> list[tuple[uuid.UUID, int]]:
    """n active tenants, each with one owner: (tenant id, user id)."""
    out = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for _ in range(n):
            tid = uuid.uuid4()
            conn.execute(
                "INSERT INTO tenants (id, name, slug, region, plan, status) VALUES (%s, %s, %s, 'CH', 'pro', 'active')",
                (tid, f"t {tid}", f"t-{tid.hex[:16]}"),
            )
            uid = conn.execute(
                "INSERT INTO users (email, name) VALUES (%s, 'owner') RETURNING id", (f"{tid.hex}@example.ch",)
            ).fetchone()[0]
            conn.execute("INSERT INTO tenant_users (tenant_id, user_id, role) VALUES (%s, %s, 'owner')", (tid, uid))
            out.append((tid, uid))
        conn.execute("""SELECT platform.tenant_set_limits(id, '{"requests_per_minute": 1000000}') FROM tenants""")
    return out


@pytest.fixture
async def pooled(migrated_db: str) -> AsyncIterator[Database]:
    """The service's pool (10 client connections) through PgBouncer with 2 server connections."""
    direct = server.app_direct_conninfo(settings_for(migrated_db), migrated_db)
    settings = settings_for(
        migrated_db, app_database_url=pooler(migrated_db).url(direct), pool_min_size=10, pool_max_size=10
    )
    db = bootstrap.database(settings, migrated_db)
    assert not db.prepared_statements, "auto: no prepared statements behind a pooler"
    async with db:
        yield db


@needs_pgbouncer
async def test_many_clients_over_fewer_server_connections_never_mix_tenants(pooled: Database, migrated_db: str) -> None:
    who = members(migrated_db, 8)
    outsider = members(migrated_db, 1)[0][1]  # a user of another tenant: the gate refuses them
    rng = random.Random(11)
    seen: dict[int, set[int]] = defaultdict(set)  # client connection -> server sessions (backend pids)
    written: dict[uuid.UUID, set[str]] = defaultdict(set)
    failures: list[str] = []

    async def request(i: int) -> None:
        tenant, user = rng.choice(who)
        kind = rng.random()
        try:
            if kind < 0.15:  # no tenant: nothing visible, no setting left from before
                async with pooled.anonymous(user_id=user, read_only=True) as tx:
                    row = await tx.fetchrow(
                        "SELECT current_setting('app.tenant_id', true) AS t, pg_backend_pid() AS "
                        "pid, (SELECT count(*) FROM projects) AS n"
                    )
                    seen[id(tx.connection)].add(row["pid"])
                if row["t"] or row["n"]:
                    failures.append(f"{i}: anonymous request saw tenant {row['t']!r} and {row['n']} projects")
            elif kind < 0.25:  # refused by the gate, in the same round trip as its statement
                ctx = TenantContext(tenant_id=tenant, user_id=outsider)
                with pytest.raises(psycopg.Error, match="not a member") as refused:
                    async with pooled.tenant(ctx, read_only=True, gate=GATE_READ) as tx:
                        await tx.fetch("SELECT * FROM projects")
                assert refused.value.sqlstate == "IA403"
            elif kind < 0.6:  # a write over two round trips, then its commit
                ctx = TenantContext(tenant_id=tenant, user_id=user, request_id=f"r{i}")
                before = ratelimit.postgres_counter(tenant, None)
                async with pooled.tenant(ctx, gate=GATE_WRITE, before=before) as tx:
                    await tx.execute(
                        "INSERT INTO projects (tenant_id, name) VALUES (%s, %s)", (tenant, f"{tenant}:{i}")
                    )
                    await asyncio.sleep(0)  # let other requests interleave (not synchronisation)
                    rows = await tx.fetch("SELECT tenant_id, name, pg_backend_pid() AS pid FROM projects")
                    seen[id(tx.connection)].add(rows[0]["pid"])
                written[tenant].add(f"{tenant}:{i}")
                if any(r["tenant_id"] != tenant for r in rows):
                    failures.append(f"{i}: a write as {tenant} saw another tenant's rows")
            else:  # a read-only request: one round trip
                ctx = TenantContext(tenant_id=tenant, user_id=user)
                async with pooled.tenant(
                    ctx, read_only=True, gate=GATE_READ, before=ratelimit.postgres_counter(tenant, None)
                ) as tx:
                    rows = await tx.fetch(
                        "SELECT tenant_id, current_setting('app.tenant_id') AS t, "
                        "pg_backend_pid() AS pid FROM projects UNION ALL SELECT NULL, "
                        "current_setting('app.tenant_id'), pg_backend_pid()"
                    )
                    seen[id(tx.connection)].add(rows[0]["pid"])
                if any(r["t"] != str(tenant) or r["tenant_id"] not in (None, tenant) for r in rows):
                    failures.append(f"{i}: a read as {tenant} saw {rows[:3]}")
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            failures.append(f"{i}: {type(err).__name__}: {err}")

    await asyncio.gather(*(request(i) for i in range(600)))
    assert not failures, failures[:10]
    servers = set().union(*seen.values())
    assert len(servers) <= PGBOUNCER_POOL_SIZE < len(seen), (servers, len(seen))
    # The pooler did hand one client connection's transactions to different server sessions.
    assert any(len(pids) > 1 for pids in seen.values()), seen
    for tenant, _ in who:
        async with pooled.tenant(TenantContext(tenant_id=tenant), read_only=True) as tx:
            assert {r["name"] for r in await tx.fetch("SELECT name FROM projects")} == written[tenant]


@needs_pgbouncer
async def test_listen_uses_a_direct_connection(pooled: Database, migrated_db: str) -> None:
    """LISTEN through a transaction pooler would sit on a server session the pooler hands to
    others, and the notification would never reach the worker."""
    wake, stop = asyncio.Event(), asyncio.Event()
    listener = asyncio.create_task(pooled.listen("iafactory_test_channel", wake, stop))
    try:
        async with await psycopg.AsyncConnection.connect(migrated_db, autocommit=True) as conn:
            for _ in range(50):  # until the listener is up: a NOTIFY sent before LISTEN is lost
                await conn.execute("NOTIFY iafactory_test_channel")
                try:
                    await asyncio.wait_for(wake.wait(), 0.2)
                    break
                except TimeoutError:
                    continue
        assert wake.is_set()
    finally:
        stop.set()
        listener.cancel()


@pytest.mark.parametrize("prepared", [False, True], ids=["unprepared", "prepared"])
async def test_a_server_session_keeps_nothing_from_a_request(migrated_db: str, prepared: bool) -> None:
    """Whatever a request did, the server session it used is left as a pooler expects it: no
    prepared statement (unless asked for), no session setting, no LISTEN, no tenant."""
    [(tenant, user)] = members(migrated_db, 1)
    settings = settings_for(
        migrated_db,
        pool_min_size=1,
        pool_max_size=1,
        db_prepared_statements="on" if prepared else "off",
        app_database_url=server.app_direct_conninfo(settings_for(migrated_db), migrated_db),
    )
    ctx = TenantContext(tenant_id=tenant, user_id=user, client_ip="10.0.0.1", request_id="abc")
    async with bootstrap.database(settings, migrated_db) as db:
        async with db.tenant(
            ctx, read_only=True, gate=GATE_READ, before=ratelimit.postgres_counter(tenant, None)
        ) as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
            await tx.fetch("SELECT * FROM projects WHERE tenant_id = %s", (tenant,))
        async with db.tenant(ctx, gate=GATE_WRITE) as tx:
            await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'x')", (tenant,))
            await tx.fetchrow("SELECT * FROM projects WHERE tenant_id = %s", (tenant,), last=True)
        with pytest.raises(psycopg.errors.CheckViolation):
            async with db.tenant(ctx) as tx:
                await tx.execute("INSERT INTO projects (tenant_id, name, status) VALUES (%s, 'y', 'nope')", (tenant,))
        async with db.anonymous(user_id=user) as tx:
            assert await tx.fetchval("SELECT pg_backend_pid()") == pid  # the same server session
            state = await tx.fetchrow(
                """SELECT (SELECT count(*) FROM pg_prepared_statements) AS prepared,
                          (SELECT count(*) FROM pg_listening_channels()) AS listening,
                          (SELECT array_agg(name) FROM pg_settings WHERE source = 'session') AS session_settings,
                          current_setting('app.tenant_id', true) AS tenant"""
            )
    assert state["listening"] == 0
    assert state["session_settings"] is None
    assert state["tenant"] == ""
    assert (state["prepared"] > 0) is prepared


def client_messages(trace: str) -> list[tuple[str, str]]:
    """(message type, rest) of each message the client sent, from a libpq trace."""
    out = []
    for line in trace.splitlines():
        parts = line.split("\t", 3)
        if len(parts) >= 3 and parts[0] == "F":
            out.append((parts[2].strip(), parts[3].strip() if len(parts) > 3 else ""))
    return out


async def test_the_tenant_setting_travels_alone_and_a_read_costs_one_round_trip(migrated_db: str) -> None:
    """Citus forwards the text of the message that carried a SET LOCAL to every worker: the tenant
    setting must be a message of its own. And a read-only request is one round trip."""
    [(tenant, user)] = members(migrated_db, 1)
    settings = settings_for(migrated_db, pool_min_size=1, pool_max_size=1)
    ctx = TenantContext(tenant_id=tenant, user_id=user)
    async with bootstrap.database(settings, migrated_db) as db:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace"
            with open(path, "w") as sink:  # noqa: ASYNC230 (a test: libpq writes the trace to this fd)
                async with db.tenant(
                    ctx, read_only=True, gate=GATE_READ, before=ratelimit.postgres_counter(tenant, None)
                ) as tx:
                    tx.connection.pgconn.trace(sink.fileno())
                    tx.connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
                    rows = await tx.fetch("SELECT id FROM projects WHERE tenant_id = %s", (tenant,))
                    tx.connection.pgconn.untrace()
            trace = path.read_text()
    assert rows == []
    sent = client_messages(trace)
    texts = [rest for kind, rest in sent if kind in ("Parse", "Query")]
    assert not [t for kind, t in sent if kind == "Query"], "no simple-query message"
    tenant_messages = [t for t in texts if "app.tenant_id" in t]
    assert tenant_messages == [f'"" "SET LOCAL app.tenant_id = \'{tenant}\'" 0'], tenant_messages
    assert not [t for t in texts if re.search(r"\bPREPARE\b", t, re.I)]
    assert [kind for kind, _ in sent].count("Sync") == 1, "one round trip"
    assert trace.count("ReadyForQuery") == 1
    # The query's value was bound, not spliced into its text.
    assert any("WHERE tenant_id = $1" in t for t in texts) and not any(
        str(tenant) in t for t in texts if "SET LOCAL" not in t
    )


async def test_the_app_role_asks_citus_to_propagate_set_local(migrated_db: str) -> None:
    """`citus.propagate_set_commands = 'local'` is a role default of the application role. Without
    Citus it is a placeholder setting: set all the same, and no connection fails over it."""
    direct = server.app_direct_conninfo(settings_for(migrated_db), migrated_db)
    with psycopg.connect(direct) as conn:
        assert conn.execute("SELECT current_setting('citus.propagate_set_commands', true)").fetchone()[0] == "local"


async def test_prepared_statements_beyond_the_per_connection_bound_are_closed(
    migrated_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With prepared statements on, a connection keeps at most PREPARED_PER_CONNECTION of them
    (least recently used closed first), a statement whose Parse fails is not remembered, and every
    answer stays right."""
    from iafactory.db import scope

    monkeypatch.setattr(scope, "PREPARED_PER_CONNECTION", 3)
    [(tenant, _user)] = members(migrated_db, 1)
    settings = settings_for(
        migrated_db,
        pool_min_size=1,
        pool_max_size=1,
        db_prepared_statements="on",
        app_database_url=server.app_direct_conninfo(settings_for(migrated_db), migrated_db),
    )
    async with bootstrap.database(settings, migrated_db) as db:
        for round_ in range(2):
            for k in range(8):  # eight different statements, each with a parameter
                async with db.tenant(TenantContext(tenant_id=tenant), read_only=True) as tx:
                    assert await tx.fetchval(f"SELECT %s::int + {k}", (round_,)) == round_ + k
            with pytest.raises(psycopg.errors.UndefinedTable):
                async with db.tenant(TenantContext(tenant_id=tenant), read_only=True) as tx:
                    await tx.fetch("SELECT * FROM no_such_table WHERE x = %s", (1,))
        async with db.anonymous() as tx:
            names = [r["name"] for r in await tx.fetch("SELECT name FROM pg_prepared_statements")]
    assert 0 < len(names) <= 3, names
    assert len(scope._prepared) == 1 and len(next(iter(scope._prepared.values()))) == len(names)


def test_prepared_statements_auto_means_only_on_a_direct_pool_url() -> None:
    from iafactory.config import Settings

    def settings_for(admin: str, **overrides: object) -> Settings:  # never through the session's pooler
        return Settings(database_url=admin, **{**TEST_SECRETS, **overrides})  # type: ignore[arg-type]

    admin = "postgresql://postgres@db.internal:5432/iafactory"
    pooled = "postgresql://iafactory_app:pw@pgbouncer:6432/iafactory"
    assert server.prepared_statements(settings_for(admin), admin)  # derived: direct
    assert not server.prepared_statements(settings_for(admin, app_database_url=pooled), admin)
    assert server.prepared_statements(settings_for(admin, app_database_url=pooled, db_prepared_statements="on"), admin)
    assert not server.prepared_statements(settings_for(admin, db_prepared_statements="off"), admin)
    # LISTEN never goes to the pooler: the direct URL is derived from DATABASE_URL unless given.
    settings = settings_for(admin, app_database_url=pooled)
    assert "pgbouncer" not in server.app_direct_conninfo(settings, admin)
    assert (
        server.app_direct_conninfo(settings.model_copy(update={"app_direct_database_url": "postgresql://x@y/z"}), admin)
        == "postgresql://x@y/z"
    )
