"""The only door to PostgreSQL.

Every connection the application opens comes from here, and this is the only module that sets
`app.tenant_id`. Three scopes exist:

* `Database.tenant(ctx)`: a transaction on the pooled *application* role (no superuser, no
  BYPASSRLS, owns nothing) in which `SET LOCAL app.tenant_id` names exactly one tenant. Row-Level
  Security then hides every other tenant's rows and refuses writes into them. `SET LOCAL` (not
  `set_config`, not a session `SET`) because it dies with the transaction, so a pooled connection
  can never carry one tenant's setting into another's request, and because Citus propagates it to
  the shards (`citus.propagate_set_commands = 'local'`).
* `Database.anonymous()`: the same role with no tenant set. Tenant tables show zero rows and
  refuse writes; only the narrow SECURITY DEFINER functions of the pre-tenant steps (login,
  API-key lookup, list my tenants) answer.
* `operator_transaction()` / `admin_connect()`: the administrative URL, for the migration runner
  and operator commands. Never used to serve a request.

Cost: setting the tenant must not add round trips. The prelude (`BEGIN`, `SET LOCAL ...`, an
optional gate statement) travels in the same simple-query message as the first real statement,
which runs as `EXECUTE` of a statement prepared once per connection (`PREPARE` rides along the
first time). A read-only scope sends `BEGIN READ ONLY; SET LOCAL ...; EXECUTE ...; COMMIT` as one
message per statement: one round trip, no separate commit. Parameters are rendered as literals by
psycopg's own adapters (`sql.Literal`), never by string formatting.

Load: a scope takes a slot of the pool's `Gate` (iafactory/admission.py) before it takes a
connection: a cap per tenant, a bounded queue, a short wait, and a request whose client went away
never gets one. `_Health` notices a database that went away and brings the pool back as soon as it
returns (psycopg_pool alone backs off up to 32 s between reconnection attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from time import monotonic
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from iafactory import jsonvalues
from iafactory.admission import ANONYMOUS, CREDENTIALS, Gate, Unavailable
from iafactory.tenancy.context import TenantContext, request_metadata

log = logging.getLogger("iafactory.db")

Params = Sequence[Any] | None
Conn = psycopg.AsyncConnection[dict[str, Any]]

_PLACEHOLDER = re.compile(r"%%|%s")

# Per connection: SQL text -> name of the server-side prepared statement, least recently used first.
_prepared: weakref.WeakKeyDictionary[Conn, OrderedDict[str, str]] = weakref.WeakKeyDictionary()
PREPARED_PER_CONNECTION = 256
_names = itertools.count(1)

# json and jsonb columns load with no depth limit: a value nested too deeply for `json.loads`
# (stored before the request limits, or by an operator) is still read, never a failed query.
set_json_loads(jsonvalues.loads)


def _to_dollar_params(query: str) -> str:
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else f"${next(counter)}", query)


def _render(conn: Conn, query: str | sql.Composable) -> str:
    return query if isinstance(query, str) else query.as_string(conn)


def _literal(conn: Conn, value: Any) -> str:
    """An SQL literal for `value`. UUIDs, ints and None cannot carry quotes, so they take a fast
    path; everything else goes through psycopg's adapters (escaping, casts, JSON, arrays)."""
    if value is None:
        return "NULL"
    kind = type(value)
    if kind is uuid.UUID:
        return f"'{value}'::uuid"
    if kind is int:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    return sql.Literal(value).as_string(conn)


def _inline(conn: Conn, query: str, params: Params) -> str:
    """`query` with each %s replaced by the literal of its parameter."""
    values = iter(params or ())
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else _literal(conn, next(values)), query)


class Transaction:
    """One transaction (or, read-only, a series of one-message transactions) as one tenant."""

    def __init__(
        self, conn: Conn, prelude: list[str], *, read_only: bool, must_send: bool = False, before: str | None = None
    ) -> None:
        self._conn = conn
        self._prelude = prelude
        # Runs once, in its own transaction, at the head of the first message (e.g. the rate-limit
        # counter, whose row lock must not last as long as the request).
        # Its commit need not wait for the WAL flush: losing a counter increment in a crash is harmless.
        self._before = ["BEGIN", "SET LOCAL synchronous_commit = off", before, "COMMIT"] if before else []
        self._read_only = read_only
        self._begun = False  # explicit mode: BEGIN and the prelude have been sent
        self._sent = False  # anything sent at all (read-only mode sends the prelude each time)
        self._must_send = must_send  # the prelude holds a gate: it runs even if nothing else does
        self._closed = False  # committed by a statement sent with last=True

    # -- public API ----------------------------------------------------------------------------
    async def fetch(
        self, query: str | sql.Composable, params: Params = None, *, last: bool = False
    ) -> list[dict[str, Any]]:
        """`last=True`: this is the transaction's last statement, so COMMIT travels in the same
        message (a single-statement write costs one round trip, like a read)."""
        cur = await self._run(query, params, last=last)
        return await cur.fetchall()

    async def fetchrow(
        self, query: str | sql.Composable, params: Params = None, *, last: bool = False
    ) -> dict[str, Any] | None:
        cur = await self._run(query, params, last=last)
        return await cur.fetchone()

    async def fetchval(self, query: str | sql.Composable, params: Params = None) -> Any:
        row = await self.fetchrow(query, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, query: str | sql.Composable, params: Params = None, *, last: bool = False) -> int:
        """Run a statement; returns its row count."""
        cur = await self._run(query, params, last=last)
        return cur.rowcount

    async def begin(self) -> None:
        """Send the prelude now (explicit mode), e.g. before using `connection` for COPY."""
        if self._read_only:
            raise psycopg.ProgrammingError("this tenant scope is read-only")
        if not self._begun:
            await self._conn.execute(";\n".join([*self._before, "BEGIN", *self._prelude]), prepare=False)
            self._before = []
            self._begun = self._sent = True

    @property
    def connection(self) -> Conn:
        """For COPY and other driver features, after `begin()`; the tenant stays in force."""
        return self._conn

    # -- internals -----------------------------------------------------------------------------
    async def _run(
        self, query: str | sql.Composable, params: Params, *, last: bool = False
    ) -> psycopg.AsyncCursor[dict[str, Any]]:
        if self._closed:
            raise psycopg.ProgrammingError("this transaction was committed by a statement marked last=True")
        text = _render(self._conn, query)
        registry = _prepared.setdefault(self._conn, OrderedDict())
        name = registry.get(text)
        statements: list[str] = []
        if self._before:
            statements.extend(self._before)
            self._before = []
        if not self._begun:
            statements.append("BEGIN READ ONLY" if self._read_only else "BEGIN")
            statements.extend(self._prelude)
        # PREPARE goes after BEGIN and the prelude: it reads the catalog, which would count as the
        # transaction's first query (SET TRANSACTION must come before any).
        new_name = None
        if name is None:
            if len(registry) >= PREPARED_PER_CONNECTION:
                statements.append(f"DEALLOCATE {registry.popitem(last=False)[1]}")
            new_name = name = f"iaf_{next(_names)}"
            statements.append(f"PREPARE {name} AS {_to_dollar_params(text)}")
        else:
            registry.move_to_end(text)
        target = len(statements)
        args = ", ".join(_literal(self._conn, p) for p in (params or ()))
        statements.append(f"EXECUTE {name}({args})" if args else f"EXECUTE {name}")
        if self._read_only:
            statements.append("COMMIT")
        elif last:
            statements.append("COMMIT")
            self._closed = True
        else:
            self._begun = True
        try:
            cur = await self._conn.execute(";\n".join(statements), prepare=False)
        except psycopg.Error:
            # PREPARE is not transactional: it may have succeeded before a later statement failed.
            if new_name is not None and await self._exists(new_name):
                registry[text] = new_name
            raise
        self._sent = True
        if new_name is not None:
            registry[text] = new_name
        for _ in range(target):
            cur.nextset()
        return cur

    async def _exists(self, name: str) -> bool:
        if self._conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            await self._conn.execute("ROLLBACK")
        row = await (
            await self._conn.execute(
                "SELECT 1 AS x FROM pg_prepared_statements WHERE name = %s", (name,), prepare=False
            )
        ).fetchone()
        return row is not None

    async def _finish(self, ok: bool) -> None:
        if ok and self._must_send and not self._sent:
            # Nothing ran: still run the gate (e.g. the membership check) before answering.
            await self._conn.execute(
                ";\n".join([*self._before, "BEGIN READ ONLY", *self._prelude, "COMMIT"]), prepare=False
            )
            self._sent = True
            return
        status = self._conn.info.transaction_status
        if status == psycopg.pq.TransactionStatus.IDLE:
            return
        await self._conn.execute("COMMIT" if ok and status == psycopg.pq.TransactionStatus.INTRANS else "ROLLBACK")


def _tenant_prelude(
    conn: Conn,
    ctx: TenantContext | None,
    gate: tuple[str, Params] | None,
    user_id: int | None = None,
    request: tuple[str | None, str | None] = (None, None),
) -> list[str]:
    statements: list[str] = []
    if ctx is None:
        if user_id is not None:
            statements.append(f"SET LOCAL app.user_id = '{int(user_id)}'")
        # The request's IP and id (checked by request_metadata), for the audit rows that platform
        # functions write without a tenant scope.
        client_ip, request_id = request
        if client_ip is not None:
            statements.append(f"SET LOCAL app.client_ip = '{client_ip}'")
        if request_id is not None:
            statements.append(f"SET LOCAL app.request_id = '{request_id}'")
    if ctx is not None:
        # TenantContext guarantees a uuid.UUID: its str() is only hex digits and dashes.
        statements.append(f"SET LOCAL app.tenant_id = '{ctx.tenant_id}'")
        if ctx.user_id is not None:
            statements.append(f"SET LOCAL app.user_id = '{int(ctx.user_id)}'")
        if ctx.api_key_id is not None:
            statements.append(f"SET LOCAL app.api_key_id = '{uuid.UUID(str(ctx.api_key_id))}'")
        # Read by the audit log's defaults. Both are validated by TenantContext.
        if ctx.client_ip is not None:
            statements.append(f"SET LOCAL app.client_ip = '{ctx.client_ip}'")
        if ctx.request_id is not None:
            statements.append(f"SET LOCAL app.request_id = '{ctx.request_id}'")
    if gate is not None:
        statements.append(_inline(conn, *gate))
    return statements


class _Scope:
    """Async context manager for one scope: a pooled (or given) connection and its Transaction.
    A plain class rather than nested generators: this sits on every request's hot path."""

    __slots__ = (
        "_before",
        "_conn",
        "_ctx",
        "_db",
        "_gate",
        "_lane",
        "_read_only",
        "_request",
        "_since",
        "_tx",
        "_user_id",
    )

    def __init__(
        self,
        db: Database | None,
        conn: Conn | None,
        ctx: TenantContext | None,
        gate: tuple[str, Params] | None,
        read_only: bool,
        user_id: int | None = None,
        before: tuple[str, Params] | None = None,
        lane: Hashable = ANONYMOUS,
        request: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self._db, self._conn, self._ctx, self._gate, self._read_only = db, conn, ctx, gate, read_only
        self._user_id = user_id
        self._before = before
        self._lane = lane
        self._since = 0.0
        self._request = request
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Transaction:
        if self._db is not None:
            self._conn = await self._db._checkout(self._lane)
            self._since = monotonic()
        assert self._conn is not None
        try:
            self._tx = Transaction(
                self._conn,
                _tenant_prelude(self._conn, self._ctx, self._gate, self._user_id, self._request),
                read_only=self._read_only,
                must_send=self._gate is not None,
                before=_inline(self._conn, *self._before) if self._before else None,
            )
        except BaseException:
            await self._release()
            raise
        return self._tx

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            assert self._tx is not None
            if exc_type is None:
                await self._tx._finish(ok=True)
            else:
                with contextlib.suppress(psycopg.Error):  # the original exception is the one that matters
                    await self._tx._finish(ok=False)
        finally:
            await self._release()

    async def _release(self) -> None:
        if self._db is not None and self._conn is not None:
            conn, self._conn = self._conn, None
            await self._db._checkin(conn, self._lane, monotonic() - self._since)


@dataclass(frozen=True)
class PoolLimits:
    """How the pool behaves under load and when the database goes away (see config.py)."""

    queue_timeout: float = 2.0  # longest wait for a connection, then 503 busy
    max_waiting: int = 256  # requests queued for a connection; more are refused at once
    tenant_slots: int | None = None  # connections one tenant may hold at once (default: half the pool)
    tenant_waiting: int | None = None  # requests one tenant may have queued (default: a quarter of max_waiting)
    anonymous_slots: int | None = None  # sign-in, registration, key lookups (default: a quarter of the pool)
    connect_timeout: int = 2  # seconds; libpq's minimum
    reconnect_timeout: float = 2.0  # a reconnection attempt gives up after this (psycopg_pool's default: 300 s)
    probe_interval: float = 0.5  # while the database is down, how often it is probed
    probe_timeout: float = 1.0


class _Health:
    """Whether the database answers.

    Nothing probes while all is well. A broken connection, a failed reconnection or a pool timeout
    starts a probe (a fresh connection of the application role, `SELECT 1`), repeated every
    `probe_interval` while it fails. A probe that finds no server (or one shutting down) marks
    the database down; one that is only slow does not (it may be the machine's load). While the database is down, scopes are refused at once
    ("database unavailable") instead of each waiting for a connection; when a probe succeeds,
    the pool's idle connections are checked (the broken ones replaced, the pool grown again) and
    service resumes, without waiting for psycopg_pool's backoff (1, 2, 4 ... 32 s)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.down_since: float | None = None
        self.reason = ""
        self.outages = 0
        self._watcher: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[str | None] | None = None
        self._probed_at = -1e9
        self._probed: str | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def suspect(self) -> None:
        """Something failed: find out whether the database is still there (in the background)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def probe(self) -> str | None:
        """Probe now (one probe at a time; a result younger than `probe_interval` is reused).
        None when the database answers, else why not."""
        if monotonic() - self._probed_at < self._db.limits.probe_interval:
            return self._probed
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._db._probe())
        reason = await asyncio.shield(self._probe)
        self._probed, self._probed_at = reason, monotonic()
        if reason is not None:
            if reason in DOWN:
                # Not there, or shutting down: down. A probe that is slow (the machine's load?),
                # finds no connection slot or is refused its login may fail where the pool's
                # open connections still work: readyz says so, requests are not turned away.
                self._mark_down(reason)
            self.suspect()
        return reason

    def _mark_down(self, reason: str) -> None:
        self.reason = reason
        if self.down_since is None:
            self.down_since = monotonic()
            self.outages += 1
            log.error("database unavailable: %s", reason)

    async def _watch(self) -> None:
        while True:
            self._probed_at = -1e9
            reason = await self.probe()
            if reason is None:
                if self.down_since is not None:
                    log.warning("database back after %.1f s", monotonic() - self.down_since)
                    self.down_since = None
                    await self._db._refresh()
                return
            await asyncio.sleep(self._db.limits.probe_interval)

    def close(self) -> None:
        for task in (self._watcher, self._probe):
            if task is not None and not task.done():
                task.cancel()


SLOW = "no answer in time"
DOWN = frozenset({"unreachable", "starting up or shutting down"})


def _reason(err: BaseException) -> str:
    """A short sentence on why the database did not answer, safe to show to anyone (no host,
    socket path or user name)."""
    if isinstance(err, (TimeoutError, psycopg.errors.ConnectionTimeout)):
        return SLOW
    text = str(err).lower()
    if "starting up" in text or "shutting down" in text or "recovery" in text:
        return "starting up or shutting down"
    if "authentication" in text or ("role" in text and "does not exist" in text):
        return "refuses the application's login"
    if "too many" in text or "remaining connection slots" in text:
        return "no connection slot left"
    return "unreachable"


class Database:
    """Owns the application pool, its admission gate and health, and hands out the tenant and
    anonymous scopes."""

    def __init__(
        self,
        app_conninfo: str,
        admin_conninfo: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        limits: PoolLimits | None = None,
    ) -> None:
        self.app_conninfo = app_conninfo
        self.admin_conninfo = admin_conninfo
        self.limits = limits = limits or PoolLimits()
        anonymous = limits.anonymous_slots or max(1, max_size // 4)
        self.gate = Gate(
            "database",
            max_size,
            max_waiting=limits.max_waiting,
            timeout=limits.queue_timeout,
            key_slots=limits.tenant_slots or max(1, max_size // 2),
            key_waiting=limits.tenant_waiting or max(1, limits.max_waiting // 4),
            lanes={ANONYMOUS: anonymous, CREDENTIALS: anonymous},
        )
        self.health = _Health(self)
        self.checked_out = 0  # connections out of the pool right now
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            app_conninfo,
            connection_class=psycopg.AsyncConnection[dict[str, Any]],
            min_size=min_size,
            max_size=max_size,
            # Statements are prepared by this module (PREPARE/EXECUTE); psycopg's own cache would
            # answer a ROLLBACK with DEALLOCATE ALL and drop ours.
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "prepare_threshold": None,
                "connect_timeout": limits.connect_timeout,
            },
            open=False,
            name="iafactory-app",
            timeout=limits.queue_timeout,
            # Give up a reconnection attempt soon: its backoff doubles up to 32 s, and the pool
            # counts a connection being retried as one it has. _Health takes over from there.
            reconnect_timeout=limits.reconnect_timeout,
            reconnect_failed=self._reconnect_failed,
        )

    async def open(self) -> None:
        await self._pool.open(wait=True)

    async def close(self) -> None:
        self.health.close()
        await self._pool.close()

    def pool_stats(self) -> dict[str, int]:
        """The pool's figures (pool_size, pool_available, requests_waiting, pool_max, ...) for
        /metrics. Read-only: get_stats(), not pop_stats(), so other readers' counters stay."""
        return self._pool.get_stats()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def tenant(
        self,
        ctx: TenantContext,
        *,
        read_only: bool = False,
        gate: tuple[str, Params] | None = None,
        before: tuple[str, Params] | None = None,
    ) -> AbstractAsyncContextManager[Transaction]:
        """A transaction as `ctx.tenant_id`.

        `gate` is a statement (`%s` placeholders) that runs right after the tenant is set and
        before anything else, e.g. a membership check that raises; if it fails nothing else runs.
        `read_only` makes every statement its own read-only transaction, in one round trip.
        `before` runs once in a short transaction of its own ahead of it, in the same message
        (the rate-limit counter).
        """
        if not isinstance(ctx, TenantContext):
            raise TypeError("Database.tenant needs a TenantContext")
        return _Scope(self, None, ctx, gate, read_only, before=before, lane=ctx.tenant_id)

    async def listen(self, channel: str, wake: Any, stop: Any) -> None:
        """Set `wake` (an asyncio.Event) on each NOTIFY on `channel` until `stop` is set. A dedicated
        connection of the application role: LISTEN holds no transaction and sees no tenant data."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", channel):
            raise ValueError(channel)
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.app_conninfo, autocommit=True, connect_timeout=self.limits.connect_timeout
                ) as conn:
                    await conn.execute(f"LISTEN {channel}")
                    async for _ in conn.notifies():
                        wake.set()
                        if stop.is_set():
                            return
            except psycopg.OperationalError:
                wake.set()  # fall back to polling until the database is back
                await asyncio.sleep(1.0)

    def anonymous(
        self,
        *,
        user_id: int | None = None,
        read_only: bool = False,
        lane: Hashable | None = None,
        client_ip: str | None = None,
        request_id: str | None = None,
    ) -> AbstractAsyncContextManager[Transaction]:
        """A transaction with no tenant: only the pre-tenant definer functions see anything.
        `user_id` (a verified user) lets a user read their own row and the platform functions
        check that they are a platform administrator. `lane`: whose share of the pool it uses
        (default: that user's, else the unauthenticated lane). `client_ip` and `request_id` go into
        the audit rows written in it (tenant creation, status, plan and limit changes, credit
        grants), as in a tenant scope."""
        if lane is None:
            lane = ("user", int(user_id)) if user_id is not None else ANONYMOUS
        return _Scope(
            self, None, None, None, read_only, user_id, lane=lane, request=request_metadata(client_ip, request_id)
        )

    # -- connections, load and health ---------------------------------------------------------
    async def _checkout(self, lane: Hashable) -> Conn:
        if self.health.down:
            raise Unavailable("database", self.health.reason)
        await self.gate.acquire(lane)
        try:
            conn = await self._pool.getconn()
        except PoolTimeout as err:
            self.gate.release(lane)
            # A slot is ours, so no other request holds this connection: the pool could not
            # open one. That is the database's doing, not load.
            self.health.suspect()
            raise Unavailable("database", "no connection could be opened in time") from err
        except BaseException:
            self.gate.release(lane)
            raise
        self.checked_out += 1
        return conn

    async def _checkin(self, conn: Conn, lane: Hashable, held: float) -> None:
        self.checked_out -= 1
        try:
            if conn.broken:
                self.health.suspect()
            await self._pool.putconn(conn)
        finally:
            self.gate.release(lane, held)

    def _reconnect_failed(self, pool: AsyncConnectionPool) -> None:
        self.health.suspect()

    async def _probe(self) -> str | None:
        try:
            async with asyncio.timeout(self.limits.probe_timeout):
                conn = await psycopg.AsyncConnection.connect(
                    self.app_conninfo, autocommit=True, connect_timeout=self.limits.connect_timeout
                )
                try:
                    await conn.execute("SELECT 1")
                finally:
                    await conn.close()
        except (TimeoutError, psycopg.Error) as err:
            log.info("database probe failed: %s", err)
            return _reason(err)
        return None

    async def _refresh(self) -> None:
        """After an outage: drop the idle connections that broke, open new ones now."""
        try:
            await self._pool.check()
        except Exception:
            log.exception("pool check after an outage failed")

    async def check(self, timeout: float) -> str | None:
        """For /readyz: None when the database answers within `timeout` seconds, else why not.
        Answers at once while the database is known to be down."""
        if self.health.down:
            return self.health.reason
        try:
            async with asyncio.timeout(timeout):
                return await self.health.probe()
        except TimeoutError:
            return SLOW

    def load_stats(self) -> dict[str, Any]:
        """For metrics: the admission gate, the pool, and whether the database answers."""
        pool = self._pool.get_stats()
        return {
            "gate": self.gate.stats(),
            "checked_out": self.checked_out,
            "pool": {
                "size": pool.get("pool_size", 0),
                "available": pool.get("pool_available", 0),
                "max": pool.get("pool_max", 0),
                "connections_errors": pool.get("connections_errors", 0),
                "connections_lost": pool.get("connections_lost", 0),
            },
            "up": not self.health.down,
            "reason": self.health.reason if self.health.down else None,
            "outages": self.health.outages,
        }


@asynccontextmanager
async def operator_transaction(
    conninfo: str, ctx: TenantContext | None = None, *, snapshot: bool = False, bulk: bool = False
) -> AsyncIterator[Transaction]:
    """A transaction on an operator's own connection (CLI commands). Without `ctx`, tenant tables
    show nothing and platform work goes through the platform.* definer functions. With `ctx`, it
    acts for that tenant (export, erasure, import). `snapshot`: one consistent REPEATABLE READ
    view. `bulk`: plan-limit, billing and audit triggers stand aside (restoring or erasing a
    tenant); the database honours that flag for operator logins only."""
    async with await admin_connect(conninfo) as conn:
        scope = _Scope(None, conn, ctx, None, False)
        async with scope as tx:
            if snapshot:
                tx._prelude.insert(0, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if bulk:
                tx._prelude.append("SET LOCAL app.bulk_operation = 'on'")
            yield tx


async def admin_connect(conninfo: str) -> Conn:
    """An autocommit connection with the administrative URL. Never serves a request."""
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, row_factory=dict_row)
