"""The only door to PostgreSQL.

Every connection the application opens comes from here, and this is the only module that sets
`app.tenant_id`. Three scopes exist:

* `Database.tenant(ctx)`: a transaction on the pooled *application* role (no superuser, no
  BYPASSRLS, owns nothing) in which `SET LOCAL app.tenant_id` names exactly one tenant. Row-Level
  Security then hides every other tenant's rows and refuses writes into them. `SET LOCAL` (not
  `set_config`, not a session `SET`) because it dies with the transaction, so a pooled connection
  can never carry one tenant's setting into another's request, and because Citus propagates it to
  the shards (`citus.propagate_set_commands = 'local'`; `set_config` never travels).
* `Database.anonymous()`: the same role with no tenant set. Tenant tables show zero rows and
  refuse writes; only the narrow SECURITY DEFINER functions of the pre-tenant steps (login,
  API-key lookup, list my tenants) answer.
* `operator_transaction()` / `admin_connect()`: the administrative URL, for the migration runner
  and operator commands. Never used to serve a request.

No server-session state. Nothing a scope does outlives its transaction on the server connection,
so the application pool can sit behind a transaction pooler (PgBouncer, `pool_mode =
transaction`), which hands each transaction whichever server connection is free: no SQL-level
`PREPARE`, no session `SET`, and `LISTEN` only on a direct connection of its own
(`Database.listen`). Protocol-level prepared statements are server-session state too: they are
used only when `prepared_statements` is on (a direct connection, or a pooler that tracks them,
e.g. PgBouncer >= 1.21 with `max_prepared_statements`).

Wire format and cost. A scope's statements go out in libpq pipeline mode: each one an
extended-protocol message of its own (Parse/Bind/Execute of the unnamed statement, with real bind
parameters), then a single Sync. `BEGIN; SET LOCAL ...; gate; statement; COMMIT` is one round
trip. `SET LOCAL app.tenant_id` is therefore never in the same message as another statement:
Citus forwards the text of the message that carried a `SET LOCAL` to the workers, so in a
multi-statement simple query it would re-run the gate and the rest there. (SET takes no bind
parameter: the value is a validated UUID's canonical text.) The commands are queued in libpq and
their results read back without psycopg's per-statement cursor machinery: that machinery cost
more, per queued statement, than the statement itself.

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
from collections.abc import AsyncIterator, Callable, Generator, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from time import monotonic
from typing import Any

import psycopg
from psycopg import errors, generators, pq, sql
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq.abc import PGconn, PGresult
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from iafactory import jsonvalues
from iafactory.admission import ANONYMOUS, CREDENTIALS, Gate, Unavailable
from iafactory.tenancy.context import TenantContext, request_metadata

log = logging.getLogger("iafactory.db")

Params = Sequence[Any] | None
Conn = psycopg.AsyncConnection[dict[str, Any]]

# One statement as it goes on the wire: its text (with $n placeholders) and its parameters.
Step = tuple[bytes, Params]

_PLACEHOLDER = re.compile(r"%%|%s")
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS

BEGIN: Step = (b"BEGIN", None)
BEGIN_READ_ONLY: Step = (b"BEGIN READ ONLY", None)
COMMIT: Step = (b"COMMIT", None)
ROLLBACK: Step = (b"ROLLBACK", None)

# Protocol-level prepared statements, per connection: (text, parameter types) -> name, least
# recently used first. Only filled when the Database was made with prepared_statements=True.
_prepared: weakref.WeakKeyDictionary[Conn, OrderedDict[tuple[bytes, tuple[int, ...]], bytes]] = (
    weakref.WeakKeyDictionary()
)
PREPARED_PER_CONNECTION = 512
_names = itertools.count(1)

# json and jsonb columns load with no depth limit: a value nested too deeply for `json.loads`
# (stored before the request limits, or by an operator) is still read, never a failed query.
set_json_loads(jsonvalues.loads)


@lru_cache(maxsize=4096)
def _wire(query: str, with_params: bool) -> tuple[bytes, int]:
    """`query` as the server reads it, and its number of placeholders. With parameters, psycopg's
    `%s` become `$1, $2, ...` and `%%` becomes `%`; without, the text goes as it is (as in psycopg)."""
    if not with_params:
        return query.encode(), 0
    counter = itertools.count(1)
    text = _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else f"${next(counter)}", query)
    return text.encode(), next(counter) - 1


def _step(conn: Conn, query: str | sql.Composable, params: Params) -> Step:
    text = query if isinstance(query, str) else query.as_string(conn)
    wire, placeholders = _wire(text, bool(params))
    if placeholders != len(params or ()):
        raise psycopg.ProgrammingError(
            f"the query has {placeholders} placeholders but {len(params or ())} parameters were passed"
        )
    return wire, (params or None)


# Set by iafactory.observability.tracing while tracing is on: a context manager around each round
# trip, given its statements. psycopg's own instrumentation wraps cursors, which scopes do not use.
round_trip_tracer: Callable[[Sequence[Step]], AbstractContextManager[Any]] | None = None


async def _exchange(conn: Conn, steps: Sequence[Step], *, prepared: bool = False) -> list[PGresult]:
    if round_trip_tracer is None:
        return await _round_trip(conn, steps, prepared=prepared)
    with round_trip_tracer(steps):
        return await _round_trip(conn, steps, prepared=prepared)


async def _round_trip(conn: Conn, steps: Sequence[Step], *, prepared: bool = False) -> list[PGresult]:
    """Send `steps` in pipeline mode followed by one Sync, and return the last result of each.

    One round trip whatever the number of steps. The server skips everything after a failed
    statement up to the Sync; the first error is raised here. An explicit transaction that failed
    stays open (status INERROR) for the caller to roll back."""
    pg = conn.pgconn
    tx = Transformer.from_context(conn)
    cache = _prepared.setdefault(conn, OrderedDict()) if prepared else None
    # Everything that can fail in Python (adapting parameters) happens before anything is sent.
    send_params, send_prepared = pg.send_query_params, pg.send_query_prepared
    sends: list[tuple[Any, tuple[Any, ...]]] = []  # (libpq call, its arguments), in order
    new: list[tuple[int, tuple[bytes, tuple[int, ...]], bytes]] = []  # prepares sent: position, key, name
    used: set[tuple[bytes, tuple[int, ...]]] = set()
    for query, params in steps:
        if not params:
            sends.append((send_params, (query, None)))
            continue
        values = tx.dump_sequence(params, [PyFormat.AUTO] * len(params))
        if cache is None:
            sends.append((send_params, (query, values, tx.types, tx.formats)))
            continue
        key = (query, tx.types or ())
        used.add(key)
        name = cache.get(key)
        if name is not None:
            cache.move_to_end(key)
        else:
            name = next((n for _, k, n in new if k == key), None)  # twice in one round trip
            if name is None:
                name = f"iaf_{next(_names)}".encode()
                new.append((len(sends), key, name))
                sends.append((pg.send_prepare, (name, query, tx.types)))
        sends.append((send_prepared, (name, values, tx.formats)))
    if cache is not None and new and len(cache) + len(new) > PREPARED_PER_CONNECTION:
        # Close the least recently used first, ahead of everything else: nothing before a Close can
        # fail and skip it (which would leave a statement on the server that nobody knows of).
        excess = len(cache) + len(new) - PREPARED_PER_CONNECTION
        oldest = [k for k in cache if k not in used][:excess]
        closes = [(pg.send_close_prepared, (cache.pop(k),)) for k in oldest]
        new = [(position + len(closes), key, name) for position, key, name in new]
        sends[:0] = closes
    collected = False
    pg.enter_pipeline_mode()
    try:
        for call, args in sends:
            call(*args)
        pg.pipeline_sync()
        results = await conn.wait(_communicate(pg, len(sends)))
        collected = True
    finally:
        if collected:
            pg.exit_pipeline_mode()
        else:
            # Interrupted half-way (cancelled, connection lost): results are still in flight and
            # the session's state is unknown. Nobody may reuse it: the pool discards it.
            pg.finish()
    for result in results:
        if result.status == _FATAL_ERROR:
            _remember(cache, new, results)
            raise errors.error_from_result(result, encoding=conn.info.encoding)
    if len(results) == len(steps):
        return results
    _remember(cache, new, results)
    return [r for (call, _), r in zip(sends, results, strict=True) if call is send_params or call is send_prepared]


def _remember(
    cache: OrderedDict[tuple[bytes, tuple[int, ...]], bytes] | None,
    new: list[tuple[int, tuple[bytes, tuple[int, ...]], bytes]],
    results: list[PGresult],
) -> None:
    """Record the statements whose Parse succeeded (one that did not run left nothing behind)."""
    for position, key, name in new:
        if results[position].status == _COMMAND_OK:
            assert cache is not None
            cache[key] = name


def _communicate(pg: PGconn, count: int) -> Generator[Any, Any, list[PGresult]]:
    """Flush what libpq queued, then read the results of `count` commands and of the Sync: one
    generator for the whole round trip, so the event loop is involved once, not once per command."""
    yield from generators.send(pg)
    results = []
    for _ in range(count):
        results.append((yield from generators.fetch_many(pg))[-1])
    yield from generators.fetch_many(pg)  # the Sync's own result
    return results


def _rows(conn: Conn, result: PGresult) -> list[dict[str, Any]]:
    if not result.nfields:
        return []
    tx = Transformer.from_context(conn)
    tx.set_pgresult(result)
    names = [result.fname(i).decode() for i in range(result.nfields)]  # type: ignore[union-attr]
    return tx.load_rows(0, result.ntuples, lambda values: dict(zip(names, values, strict=True)))


class Transaction:
    """One transaction (or, read-only, a series of one-round-trip transactions) as one tenant."""

    def __init__(
        self,
        conn: Conn,
        settings: list[Step],
        *,
        read_only: bool,
        gate: Step | None = None,
        before: Step | None = None,
        begin: Step = BEGIN,
        prepared: bool = False,
    ) -> None:
        self._conn = conn
        self._settings = settings  # SET LOCAL statements, each a message of its own
        self._gate = gate
        # Runs once, in a short transaction of its own, at the head of the first round trip (e.g.
        # the rate-limit counter, whose row lock must not last as long as the request; it makes
        # its own commit asynchronous).
        self._before: list[Step] = [BEGIN, before, COMMIT] if before else []
        self._begin = BEGIN_READ_ONLY if read_only else begin
        self._read_only = read_only
        self._prepared = prepared
        self._begun = False  # explicit mode: BEGIN and the settings have been sent
        self._sent = False  # anything sent at all (read-only mode sends the settings each time)
        self._closed = False  # committed by a statement sent with last=True

    # -- public API ----------------------------------------------------------------------------
    async def fetch(
        self, query: str | sql.Composable, params: Params = None, *, last: bool = False
    ) -> list[dict[str, Any]]:
        """`last=True`: this is the transaction's last statement, so COMMIT travels in the same
        round trip (a single-statement write costs one round trip, like a read)."""
        return _rows(self._conn, await self._run(query, params, last=last))

    async def fetchrow(
        self, query: str | sql.Composable, params: Params = None, *, last: bool = False
    ) -> dict[str, Any] | None:
        rows = _rows(self._conn, await self._run(query, params, last=last))
        return rows[0] if rows else None

    async def fetchval(self, query: str | sql.Composable, params: Params = None) -> Any:
        row = await self.fetchrow(query, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, query: str | sql.Composable, params: Params = None, *, last: bool = False) -> int:
        """Run a statement; returns its row count."""
        result = await self._run(query, params, last=last)
        return result.command_tuples if result.command_tuples is not None else -1

    async def begin(self) -> None:
        """Send BEGIN and the settings now (explicit mode), e.g. before using `connection` for a
        server-side cursor."""
        if self._read_only:
            raise psycopg.ProgrammingError("this tenant scope is read-only")
        if not self._begun:
            await _exchange(self._conn, self._opening(), prepared=self._prepared)
            self._begun = self._sent = True

    @property
    def connection(self) -> Conn:
        """For server-side cursors and other driver features, after a statement or `begin()`;
        the tenant stays in force until the transaction ends."""
        return self._conn

    # -- internals -----------------------------------------------------------------------------
    def _opening(self) -> list[Step]:
        """What the first round trip starts with: the `before` transaction, BEGIN, the settings,
        the gate (once: it authorises the request, not each statement)."""
        steps = [*self._before, self._begin, *self._settings]
        self._before = []
        if self._gate is not None:
            steps.append(self._gate)
            self._gate = None
        return steps

    async def _run(self, query: str | sql.Composable, params: Params, *, last: bool = False) -> PGresult:
        if self._closed:
            raise psycopg.ProgrammingError("this transaction was committed by a statement marked last=True")
        step = _step(self._conn, query, params)
        state = (self._before, self._gate, self._begun, self._sent, self._closed)
        if self._begun:
            steps = [step]
        elif self._read_only:
            steps = [*self._opening(), step, COMMIT]  # a transaction of its own, in one round trip
        else:
            steps = [*self._opening(), step]
            self._begun = True
        if last and not self._read_only:
            steps.append(COMMIT)
            self._closed = True
        target = len(steps) - 1 - (steps[-1] is COMMIT)
        self._sent = True
        try:
            return (await _exchange(self._conn, steps, prepared=self._prepared))[target]
        except BaseException:
            if not state[2] and self._conn.pgconn.transaction_status == _IDLE:
                # Refused before anything was sent (a parameter psycopg cannot adapt): the next
                # statement must still open the transaction and set the tenant.
                self._before, self._gate, self._begun, self._sent, self._closed = state
            raise

    async def _finish(self, ok: bool) -> None:
        if ok and self._gate is not None and not self._sent:
            # Nothing ran: still run the gate (e.g. the membership check) before answering.
            self._begin = BEGIN_READ_ONLY
            await _exchange(self._conn, [*self._opening(), COMMIT], prepared=self._prepared)
            self._sent = True
            return
        status = self._conn.pgconn.transaction_status
        if status == _IDLE:
            return
        await _exchange(self._conn, [COMMIT if ok and status == _INTRANS else ROLLBACK])


def _setting(name: str, value: str) -> Step:
    return f"SET LOCAL {name} = '{value}'".encode(), None


def _tenant_prelude(
    ctx: TenantContext | None,
    user_id: int | None = None,
    request: tuple[str | None, str | None] = (None, None),
    *,
    read_only: bool = False,
) -> list[Step]:
    """The SET LOCAL statements of a scope. Values are validated types (UUID, int, an IP address,
    a request id of letters, digits, '-' and '_'): SET takes no bind parameters. A read-only
    transaction writes no audit row, so it goes without the settings only the audit log reads."""
    statements: list[Step] = []
    if ctx is None:
        if user_id is not None:
            statements.append(_setting("app.user_id", str(int(user_id))))
        # The request's IP and id (checked by request_metadata), for the audit rows that platform
        # functions write without a tenant scope.
        client_ip, request_id = request
        if client_ip is not None and not read_only:
            statements.append(_setting("app.client_ip", client_ip))
        if request_id is not None and not read_only:
            statements.append(_setting("app.request_id", request_id))
        return statements
    # TenantContext guarantees a uuid.UUID: its str() is only hex digits and dashes.
    statements.append(_setting("app.tenant_id", str(ctx.tenant_id)))
    if ctx.user_id is not None:
        statements.append(_setting("app.user_id", str(int(ctx.user_id))))
    if ctx.api_key_id is not None:
        statements.append(_setting("app.api_key_id", str(uuid.UUID(str(ctx.api_key_id)))))
    # Read by the audit log's defaults. Both are validated by TenantContext.
    if read_only:
        return statements
    if ctx.client_ip is not None:
        statements.append(_setting("app.client_ip", ctx.client_ip))
    if ctx.request_id is not None:
        statements.append(_setting("app.request_id", ctx.request_id))
    return statements


class _Scope:
    """Async context manager for one scope: a pooled (or given) connection and its Transaction.
    A plain class rather than nested generators: this sits on every request's hot path."""

    __slots__ = (
        "_before",
        "_begin",
        "_conn",
        "_ctx",
        "_db",
        "_extra",
        "_gate",
        "_lane",
        "_prepared",
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
        *,
        begin: Step = BEGIN,
        extra: Sequence[Step] = (),
    ) -> None:
        self._db, self._conn, self._ctx, self._gate, self._read_only = db, conn, ctx, gate, read_only
        self._user_id = user_id
        self._before = before
        self._lane = lane
        self._since = 0.0
        self._request = request
        self._begin = begin
        self._extra = extra
        self._prepared = db.prepared_statements if db is not None else False
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Transaction:
        if self._db is not None:
            self._conn = await self._db._checkout(self._lane)
            self._since = monotonic()
        conn = self._conn
        assert conn is not None
        try:
            self._tx = Transaction(
                conn,
                [
                    *_tenant_prelude(self._ctx, self._user_id, self._request, read_only=self._read_only),
                    *self._extra,
                ],
                read_only=self._read_only,
                gate=_step(conn, *self._gate) if self._gate else None,
                before=_step(conn, *self._before) if self._before else None,
                begin=self._begin,
                prepared=self._prepared,
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
    anonymous scopes.

    `app_conninfo` may point at a transaction pooler; `direct_conninfo` (default: the same) is the
    application role's direct URL, for what needs a server session of its own (LISTEN).
    `prepared_statements`: protocol-level prepared statements, per server connection; only where
    the server connection stays the same (no pooler, or one that tracks them)."""

    def __init__(
        self,
        app_conninfo: str,
        admin_conninfo: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        limits: PoolLimits | None = None,
        direct_conninfo: str | None = None,
        prepared_statements: bool = False,
    ) -> None:
        self.app_conninfo = app_conninfo
        self.admin_conninfo = admin_conninfo
        self.direct_conninfo = direct_conninfo or app_conninfo
        self.prepared_statements = prepared_statements
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
            # psycopg's own automatic prepared statements would be server-session state behind
            # our back: statements are prepared here, when `prepared_statements` allows it.
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
        `before` runs once in a short transaction of its own ahead of it, in the same round trip
        (the rate-limit counter).
        """
        if not isinstance(ctx, TenantContext):
            raise TypeError("Database.tenant needs a TenantContext")
        return _Scope(self, None, ctx, gate, read_only, before=before, lane=ctx.tenant_id)

    async def listen(self, channel: str, wake: Any, stop: Any) -> None:
        """Set `wake` (an asyncio.Event) on each NOTIFY on `channel` until `stop` is set. A dedicated
        connection of the application role, on the direct URL: LISTEN is session state, which a
        transaction pooler would tie to whichever server connection it happened to use."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", channel):
            raise ValueError(channel)
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.direct_conninfo, autocommit=True, connect_timeout=self.limits.connect_timeout
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
        gate: tuple[str, Params] | None = None,
    ) -> AbstractAsyncContextManager[Transaction]:
        """A transaction with no tenant: only the pre-tenant definer functions see anything.
        `user_id` (a verified user) lets a user read their own row and the platform functions
        check that they are a platform administrator. `lane`: whose share of the pool it uses
        (default: that user's, else the unauthenticated lane). `client_ip` and `request_id` go into
        the audit rows written in it (tenant creation, status, plan and limit changes, credit
        grants), as in a tenant scope. `gate`: as in `tenant` (the caller's session still alive), in
        the round trip of the first statement."""
        if lane is None:
            lane = ("user", int(user_id)) if user_id is not None else ANONYMOUS
        return _Scope(
            self, None, None, gate, read_only, user_id, lane=lane, request=request_metadata(client_ip, request_id)
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
        scope = _Scope(
            None,
            conn,
            ctx,
            None,
            False,
            begin=(b"BEGIN ISOLATION LEVEL REPEATABLE READ", None) if snapshot else BEGIN,
            extra=[_setting("app.bulk_operation", "on")] if bulk else (),
        )
        async with scope as tx:
            yield tx


async def admin_connect(conninfo: str) -> Conn:
    """An autocommit connection with the administrative URL. Never serves a request."""
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, row_factory=dict_row)
