"""The only door to PostgreSQL.

Every connection the application opens comes from here, and this is the only module that
sets `app.tenant_id`. Three scopes exist:

* `Database.tenant(ctx)`: a transaction on the pooled *application* role (no superuser, no
  BYPASSRLS, owns nothing) in which `SET LOCAL app.tenant_id` names exactly one tenant. Row-Level
  Security then hides every other tenant's rows and refuses writes into them. `SET LOCAL` (not
  `set_config`, not a session `SET`) because it dies with the transaction, so a pooled connection
  can never carry one tenant's setting into another's request, and because Citus propagates it to
  the shards (`citus.propagate_set_commands = 'local'`).
* `Database.anonymous()`: the same role with no tenant set. Tenant tables show zero rows and
  refuse writes; only the narrow SECURITY DEFINER functions of the pre-tenant steps (login,
  API-key lookup, list my tenants) answer.
* `Database.admin()`: a plain connection with the administrative URL, for the migration runner
  and operator commands. Never used to serve a request.

The tenant prelude (BEGIN, SET LOCAL, and an optional gate statement) is sent in the same
network round trip as the first real statement, using libpq's pipeline mode: setting the tenant
costs no extra round trip.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from iafactory.tenancy.context import TenantContext

Params = Sequence[Any] | dict[str, Any] | None

_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")


class Transaction:
    """One transaction. Statements are pipelined; a fetch waits only for what it needs."""

    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]], pipeline: psycopg.AsyncPipeline) -> None:
        self._conn = conn
        self._pipeline = pipeline

    async def fetch(self, query: str | sql.Composable, params: Params = None) -> list[dict[str, Any]]:
        cur = await self._conn.execute(query, params)
        return await cur.fetchall()

    async def fetchrow(self, query: str | sql.Composable, params: Params = None) -> dict[str, Any] | None:
        cur = await self._conn.execute(query, params)
        return await cur.fetchone()

    async def fetchval(self, query: str | sql.Composable, params: Params = None) -> Any:
        row = await self.fetchrow(query, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, query: str | sql.Composable, params: Params = None) -> int:
        """Run a statement and return its row count (this waits for the server)."""
        cur = await self._conn.execute(query, params)
        await self._pipeline.sync()
        return cur.rowcount

    async def queue(self, query: str | sql.Composable, params: Params = None) -> None:
        """Send a statement without waiting for it; an error surfaces at the next wait or at commit."""
        await self._conn.execute(query, params)

    async def executemany(self, query: str | sql.Composable, params_seq: Sequence[Params]) -> None:
        async with self._conn.cursor() as cur:
            await cur.executemany(query, params_seq)

    async def set_local(self, name: str, value: str) -> None:
        """Set a transaction-local setting other than the tenant (e.g. plan_cache_mode)."""
        if name == "app.tenant_id" or not (_SETTING_NAME.match(name) or name.isidentifier()):
            raise ValueError(f"refusing to set {name!r} here")
        await self._conn.execute(sql.SQL("SET LOCAL {} = {}").format(sql.SQL(name), sql.Literal(value)))

    @property
    def connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        """For COPY and other driver features; the transaction and its tenant stay in force."""
        return self._conn


def _tenant_prelude(ctx: TenantContext | None) -> list[sql.Composable]:
    statements: list[sql.Composable] = [sql.SQL("BEGIN")]
    if ctx is not None:
        # str(UUID) is canonical hex-and-dashes; Literal quotes it anyway.
        statements.append(sql.SQL("SET LOCAL app.tenant_id = {}").format(sql.Literal(str(ctx.tenant_id))))
        if ctx.user_id is not None:
            statements.append(sql.SQL("SET LOCAL app.user_id = {}").format(sql.Literal(str(int(ctx.user_id)))))
        if ctx.api_key_id is not None:
            statements.append(sql.SQL("SET LOCAL app.api_key_id = {}").format(sql.Literal(str(ctx.api_key_id))))
    return statements


@asynccontextmanager
async def _pipelined_transaction(
    conn: psycopg.AsyncConnection[dict[str, Any]],
    ctx: TenantContext | None,
    gate: tuple[str | sql.Composable, Params] | None,
) -> AsyncIterator[Transaction]:
    try:
        async with conn.pipeline() as pipeline:
            for statement in _tenant_prelude(ctx):
                await conn.execute(statement)
            if gate is not None:
                await conn.execute(*gate)
            yield Transaction(conn, pipeline)
            await conn.execute("COMMIT")
    except BaseException:
        # The pipeline was synced on exit; end whatever is left of the transaction.
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        raise


class Database:
    """Owns the application pool and hands out the three scopes described above."""

    def __init__(self, app_conninfo: str, admin_conninfo: str, *, min_size: int = 2, max_size: int = 10) -> None:
        self.app_conninfo = app_conninfo
        self.admin_conninfo = admin_conninfo
        self._pool = AsyncConnectionPool(
            app_conninfo,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
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

    @asynccontextmanager
    async def _transaction(
        self, ctx: TenantContext | None, gate: tuple[str | sql.Composable, Params] | None
    ) -> AsyncIterator[Transaction]:
        async with self._pool.connection() as conn:
            async with _pipelined_transaction(conn, ctx, gate) as tx:
                yield tx

    def tenant(
        self, ctx: TenantContext, *, gate: tuple[str | sql.Composable, Params] | None = None
    ) -> AbstractAsyncContextManager[Transaction]:
        """A transaction as `ctx.tenant_id`. `gate` is a statement queued after the tenant is set
        (e.g. a membership check that raises); if it fails, nothing after it runs."""
        if not isinstance(ctx, TenantContext):
            raise TypeError("Database.tenant needs a TenantContext")
        return self._transaction(ctx, gate)

    def anonymous(self) -> AbstractAsyncContextManager[Transaction]:
        """A transaction with no tenant: only the pre-tenant definer functions see anything."""
        return self._transaction(None, None)

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        """A dedicated connection with the administrative URL (migrations, roles, operator tasks)."""
        async with await admin_connect(self.admin_conninfo) as conn:
            yield conn


@asynccontextmanager
async def operator_transaction(conninfo: str) -> AsyncIterator[Transaction]:
    """A transaction on an operator's own connection (CLI commands): no tenant is set, so tenant
    tables show nothing; platform work goes through the platform.* definer functions."""
    async with await admin_connect(conninfo) as conn:
        async with _pipelined_transaction(conn, None, None) as tx:
            yield tx


async def admin_connect(conninfo: str) -> psycopg.AsyncConnection[dict[str, Any]]:
    """An autocommit connection with the administrative URL. Never serves a request."""
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, row_factory=dict_row)

