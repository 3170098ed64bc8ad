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
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import errors, generators, pq, sql
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq.abc import PGconn, PGresult
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from iafactory.tenancy.context import TenantContext

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
    weakref.WeakKeyDictionary())
PREPARED_PER_CONNECTION = 512
_names = itertools.count(1)


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
            f"the query has {placeholders} placeholders but {len(params or ())} parameters were passed")
    return wire, (params or None)


async def _exchange(conn: Conn, steps: Sequence[Step], *, prepared: bool = False) -> list[PGresult]:
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
        key = (query, tx.types)
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
    return [r for (call, _), r in zip(sends, results) if call is send_params or call is send_prepared]


def _remember(cache: OrderedDict[tuple[bytes, tuple[int, ...]], bytes] | None,
              new: list[tuple[int, tuple[bytes, tuple[int, ...]], bytes]], results: list[PGresult]) -> None:
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
    return tx.load_rows(0, result.ntuples, lambda values: dict(zip(names, values)))


class Transaction:
    """One transaction (or, read-only, a series of one-round-trip transactions) as one tenant."""

    def __init__(self, conn: Conn, settings: list[Step], *, read_only: bool, gate: Step | None = None,
                 before: Step | None = None, begin: Step = BEGIN, prepared: bool = False) -> None:
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
    async def fetch(self, query: str | sql.Composable, params: Params = None, *, last: bool = False
                    ) -> list[dict[str, Any]]:
        """`last=True`: this is the transaction's last statement, so COMMIT travels in the same
        round trip (a single-statement write costs one round trip, like a read)."""
        return _rows(self._conn, await self._run(query, params, last=last))

    async def fetchrow(self, query: str | sql.Composable, params: Params = None, *, last: bool = False
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


def _tenant_prelude(ctx: TenantContext | None, user_id: int | None = None, *, read_only: bool = False
                    ) -> list[Step]:
    """The SET LOCAL statements of a scope. Values are validated types (UUID, int, an IP address,
    a request id of letters, digits, '-' and '_'): SET takes no bind parameters. A read-only
    transaction writes no audit row, so it goes without the settings only the audit log reads."""
    statements: list[Step] = []
    if ctx is None and user_id is not None:
        statements.append(_setting("app.user_id", str(int(user_id))))
    if ctx is not None:
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

    __slots__ = ("_pool", "_conn", "_ctx", "_gate", "_read_only", "_tx", "_user_id", "_before", "_begin",
                 "_extra", "_prepared")

    def __init__(self, pool: AsyncConnectionPool | None, conn: Conn | None, ctx: TenantContext | None,
                 gate: tuple[str, Params] | None, read_only: bool, user_id: int | None = None,
                 before: tuple[str, Params] | None = None, *, begin: Step = BEGIN, extra: Sequence[Step] = (),
                 prepared: bool = False) -> None:
        self._pool, self._conn, self._ctx, self._gate, self._read_only = pool, conn, ctx, gate, read_only
        self._user_id = user_id
        self._before = before
        self._begin = begin
        self._extra = extra
        self._prepared = prepared
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Transaction:
        if self._pool is not None:
            self._conn = await self._pool.getconn()
        conn = self._conn
        assert conn is not None
        try:
            self._tx = Transaction(
                conn, [*_tenant_prelude(self._ctx, self._user_id, read_only=self._read_only), *self._extra],
                read_only=self._read_only,
                gate=_step(conn, *self._gate) if self._gate else None,
                before=_step(conn, *self._before) if self._before else None,
                begin=self._begin, prepared=self._prepared)
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
                try:
                    await self._tx._finish(ok=False)
                except psycopg.Error:
                    pass  # the original exception is the one that matters
        finally:
            await self._release()

    async def _release(self) -> None:
        if self._pool is not None and self._conn is not None:
            await self._pool.putconn(self._conn)
            self._conn = None


class Database:
    """Owns the application pool and hands out the tenant and anonymous scopes.

    `app_conninfo` may point at a transaction pooler; `direct_conninfo` (default: the same) is the
    application role's direct URL, for what needs a server session of its own (LISTEN).
    `prepared_statements`: protocol-level prepared statements, per server connection; only where
    the server connection stays the same (no pooler, or one that tracks them)."""

    def __init__(self, app_conninfo: str, admin_conninfo: str, *, min_size: int = 2, max_size: int = 10,
                 direct_conninfo: str | None = None, prepared_statements: bool = False) -> None:
        self.app_conninfo = app_conninfo
        self.admin_conninfo = admin_conninfo
        self.direct_conninfo = direct_conninfo or app_conninfo
        self.prepared_statements = prepared_statements
        self._pool = AsyncConnectionPool(
            app_conninfo,
            min_size=min_size,
            max_size=max_size,
            # psycopg's own automatic prepared statements would be server-session state behind
            # our back: statements are prepared here, when `prepared_statements` allows it.
            kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": None},
            open=False,
            name="iafactory-app",
        )

    async def open(self) -> None:
        await self._pool.open(wait=True)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def tenant(
        self, ctx: TenantContext, *, read_only: bool = False, gate: tuple[str, Params] | None = None,
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
        return _Scope(self._pool, None, ctx, gate, read_only, before=before, prepared=self.prepared_statements)

    async def listen(self, channel: str, wake: Any, stop: Any) -> None:
        """Set `wake` (an asyncio.Event) on each NOTIFY on `channel` until `stop` is set. A dedicated
        connection of the application role, on the direct URL: LISTEN is session state, which a
        transaction pooler would tie to whichever server connection it happened to use."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", channel):
            raise ValueError(channel)
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.direct_conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {channel}")
                    async for _ in conn.notifies():
                        wake.set()
                        if stop.is_set():
                            return
            except psycopg.OperationalError:
                wake.set()  # fall back to polling until the database is back
                await asyncio.sleep(1.0)

    def anonymous(self, *, user_id: int | None = None, read_only: bool = False) -> AbstractAsyncContextManager[Transaction]:
        """A transaction with no tenant: only the pre-tenant definer functions see anything.
        `user_id` (a verified user) lets a user read their own row and the platform functions
        check that they are a platform administrator."""
        return _Scope(self._pool, None, None, None, read_only, user_id, prepared=self.prepared_statements)


@asynccontextmanager
async def operator_transaction(conninfo: str, ctx: TenantContext | None = None, *, snapshot: bool = False,
                               bulk: bool = False) -> AsyncIterator[Transaction]:
    """A transaction on an operator's own connection (CLI commands). Without `ctx`, tenant tables
    show nothing and platform work goes through the platform.* definer functions. With `ctx`, it
    acts for that tenant (export, erasure, import). `snapshot`: one consistent REPEATABLE READ
    view. `bulk`: plan-limit, billing and audit triggers stand aside (restoring or erasing a
    tenant); the database honours that flag for operator logins only."""
    async with await admin_connect(conninfo) as conn:
        scope = _Scope(None, conn, ctx, None, False,
                       begin=(b"BEGIN ISOLATION LEVEL REPEATABLE READ", None) if snapshot else BEGIN,
                       extra=[_setting("app.bulk_operation", "on")] if bulk else ())
        async with scope as tx:
            yield tx


async def admin_connect(conninfo: str) -> Conn:
    """An autocommit connection with the administrative URL. Never serves a request."""
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, row_factory=dict_row)
