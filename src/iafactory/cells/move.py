"""Moving a tenant to the cell of another region: `iafactory tenants move SLUG --region XX`.

Steps, each recorded in the directory's journal (directory.tenant_moves) once done, so that a mover
killed at any point (kill -9) resumes from the last recorded step when run again; every step is
safe to run twice:

  started   the journal row exists and directory.tenants.moving_to names the target cell.
  frozen    the tenant is read-only in its source cell (tenant_freezes: app.authorize refuses
            writes with 503 + Retry-After; reads go on), and no write that began before the freeze
            can still commit (see `_freeze`).
  copied    an export of the source (portability.export_tenant) is imported into the target cell
            in ONE transaction with the same ids, the tenant's region set to the target's (the
            target refuses any other), user ids translated (below) and the copy frozen; row counts
            and SHA-256 checksums computed in both cells in the same canonical form
            (portability.table_checksums) must agree before that transaction commits.
  switched  in one directory transaction: the route (cell, region, moving_to NULL), the moved API
            key prefixes (directory.moved_api_keys: existing keys keep working) and the members'
            login hashes for the target cell.
  erased    the source copy is erased with proof (portability.erase_tenant, reason noted), then the
            tenant row, its slug and the accounts of people who belonged to no other tenant there.
  done      the freeze in the target is lifted: the tenant is writable again, in its new cell.

A failure before `switched` (checksums differ, the target refuses) rolls the move back: the target
holds nothing of the tenant, the source is unfrozen, the journal says `failed` with the reason.

Ids: tenants are UUIDs and every key of a tenant table includes tenant_id, so the rows keep their
ids in the target; identity columns of tenant tables (projects.id, …) are copied as they are and
the target's sequences are moved past them (portability.insert_rows). users.id is the only
identity that is not the tenant's own: each cell numbers its accounts, so a member is matched by
email in the target (an existing account there is reused, password included) or created there,
and every users.id column of the tenant's rows is translated.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from iafactory.cells import directory
from iafactory.cells.config import Cell, cell_for_region, cells, directory_cell
from iafactory.cells.service import admin_url
from iafactory.config import Settings
from iafactory.db.scope import Transaction, admin_connect, operator_transaction
from iafactory.tenancy import portability
from iafactory.tenancy.context import TenantContext

STEPS = ("started", "frozen", "copied", "switched", "erased", "done")
CRASH_ENV = "IAFACTORY_MOVE_CRASH_AFTER"  # tests only: SIGKILL the mover right after this step
RETRY_AFTER_SECONDS = 30
# How long the freeze waits for transactions that began before it before the move gives up.
DRAIN_TIMEOUT_SECONDS = 60.0
DRAIN_POLL_SECONDS = 0.02

Progress = Callable[[str, int, int], None]  # (what, done, total)


class MoveError(Exception):
    """The move cannot go on; the message is meant for the operator."""


class CopyFailed(MoveError):
    """The copy was refused or does not match: the move is rolled back."""


@dataclass
class Move:
    id: int
    tenant_id: UUID
    slug: str
    from_cell: str
    to_cell: str
    from_region: str
    to_region: str
    step: str
    checksums: dict[str, Any]
    frozen_at: Any
    unfrozen_at: Any


def _crash_after(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


async def move_tenant(
    settings: Settings, slug: str, region: str, progress: Progress | None = None, say: Callable[[str], None] = print
) -> Move:
    """Move (or resume moving) `slug` to the cell serving `region`. Returns the finished journal row."""
    if settings.cells is None:
        raise MoveError("a move needs cells: IAFACTORY_CELLS is not set (one cell serves every region)")
    configured = cells(settings)
    target = cell_for_region(configured, region)
    dir_url = admin_url(settings, directory_cell())
    async with operator_transaction(dir_url) as dtx:
        route = await directory.route(dtx, slug=slug)
        if route is None:
            raise MoveError(f"no tenant with slug {slug!r}")
        move = await _active(dtx, route.tenant_id)
        if move is None:
            if route.cell == target.name and route.region == region:
                raise MoveError(f"tenant {slug} is already in {region} (cell {target.name})")
            if route.cell not in configured:
                raise MoveError(f"tenant {slug} is in cell {route.cell!r}, which IAFACTORY_CELLS does not name")
            if route.cell == target.name:
                # Same cell, another region it serves: a change of label, no copy.
                raise MoveError(
                    f"cell {target.name} serves both {route.region} and {region}: nothing to move between cells"
                )
            row = await dtx.fetchrow(
                """INSERT INTO directory.tenant_moves (tenant_id, slug, from_cell, to_cell, from_region, to_region)
                   VALUES (%s, %s, %s, %s, %s, %s) RETURNING *""",
                (route.tenant_id, slug, route.cell, target.name, route.region, region),
            )
            await dtx.execute(
                "UPDATE directory.tenants SET moving_to = %s, updated_at = now() WHERE id = %s",
                (target.name, route.tenant_id),
            )
            assert row is not None  # INSERT ... RETURNING
            move = _move(row)
        elif move.to_region != region:
            raise MoveError(
                f"tenant {slug} is already being moved to {move.to_region} (cell {move.to_cell}); "
                f"run `iafactory tenants move {slug} --region {move.to_region}` to finish that move first"
            )
        else:
            say(f"resuming the move of {slug} to {move.to_region} after step {move.step}")
    _crash_after("started")
    mover = _Mover(settings, dir_url, configured[move.from_cell], configured[move.to_cell], move, progress, say)
    await mover.run()
    return mover.move


def _move(row: dict[str, Any]) -> Move:
    return Move(**{k: row[k] for k in Move.__dataclass_fields__})


async def _active(dtx: Transaction, tenant_id: UUID) -> Move | None:
    row = await dtx.fetchrow(
        "SELECT * FROM directory.tenant_moves WHERE tenant_id = %s AND step NOT IN ('done', 'failed') FOR UPDATE",
        (tenant_id,),
    )
    return _move(row) if row else None


class _Mover:
    def __init__(
        self,
        settings: Settings,
        dir_url: str,
        source: Cell,
        target: Cell,
        move: Move,
        progress: Progress | None,
        say: Callable[[str], None],
    ) -> None:
        self.settings, self.dir_url, self.move = settings, dir_url, move
        self.source_url, self.target_url = admin_url(settings, source), admin_url(settings, target)
        self.progress, self.say = progress, say

    def _tick(self, what: str, done: int = 1, total: int = 1) -> None:
        if self.progress:
            self.progress(what, done, total)

    async def _record(self, step: str, dtx: Transaction | None = None, **fields: Any) -> None:
        sets: list[sql.Composable] = [sql.SQL("step = %s"), sql.SQL("updated_at = now()")]
        values: list[Any] = [step]
        for name, value in fields.items():
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(name)))
            values.append(Jsonb(value) if isinstance(value, dict) else value)
        query = sql.SQL("UPDATE directory.tenant_moves SET {} WHERE id = %s").format(sql.SQL(", ").join(sets))
        if dtx is not None:
            await dtx.execute(query, (*values, self.move.id))
        else:
            async with operator_transaction(self.dir_url) as tx:
                await tx.execute(query, (*values, self.move.id))
        self.move.step = step
        for name, value in fields.items():
            setattr(self.move, name, value)

    async def run(self) -> None:
        m = self.move
        if m.step == "started":
            await self._freeze()
            await self._record("frozen", frozen_at=self._frozen_at)
            _crash_after("frozen")
        if m.step == "frozen":
            try:
                checksums = await self._copy()
            except (CopyFailed, portability.PortabilityError, psycopg.Error) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                await self._roll_back(reason)
                raise CopyFailed(
                    f"the copy to cell {m.to_cell} failed, the tenant stays writable in cell {m.from_cell}: {reason}"
                ) from err
            await self._record("copied", checksums=checksums)
            _crash_after("copied")
        if m.step == "copied":
            await self._switch()
            _crash_after("switched")
        if m.step == "switched":
            await self._erase_source()
            await self._record("erased")
            _crash_after("erased")
        if m.step == "erased":
            async with operator_transaction(self.target_url) as tx:
                await tx.execute("DELETE FROM tenant_freezes WHERE frozen_tenant = %s", (m.tenant_id,))
                await tx.execute(
                    "SELECT app.record_event(%s, 'tenant.move_finished', NULL, %s, NULL, NULL)",
                    (m.tenant_id, Jsonb({"from_cell": m.from_cell, "to_cell": m.to_cell})),
                )
            async with operator_transaction(self.dir_url) as dtx:
                await dtx.execute(
                    "UPDATE directory.tenant_moves SET step = 'done', unfrozen_at = now(), updated_at = now() "
                    "WHERE id = %s RETURNING unfrozen_at",
                    (m.id,),
                )
                m.unfrozen_at = await dtx.fetchval(
                    "SELECT unfrozen_at FROM directory.tenant_moves WHERE id = %s", (m.id,)
                )
            m.step = "done"
            self._tick("unfreeze")

    # --- freeze ---------------------------------------------------------------------------------
    async def _freeze(self) -> None:
        m = self.move
        async with operator_transaction(self.source_url) as tx:
            await tx.execute(
                "INSERT INTO tenant_freezes (frozen_tenant, reason, retry_after) VALUES (%s, %s, %s) "
                "ON CONFLICT (frozen_tenant) DO NOTHING",
                (m.tenant_id, f"moving to cell {m.to_cell}", RETRY_AFTER_SECONDS),
            )
            # Audited in the source; the event travels with the tenant's audit log to the target.
            await tx.execute(
                "SELECT app.record_event(%s, 'tenant.move_started', NULL, %s, NULL, NULL)",
                (m.tenant_id, Jsonb({"from_cell": m.from_cell, "to_cell": m.to_cell, "to_region": m.to_region})),
            )
        # The freeze is committed: a transaction that starts from now on runs app.authorize with a
        # snapshot taken after this commit (a snapshot is taken at a transaction's first statement,
        # which is after its xact_start), so it sees the freeze and cannot write. A transaction
        # that started before may have passed app.authorize already and could still commit a
        # write after the copy's snapshot, which the copy would miss and the erasure would lose.
        # So wait until every transaction of this database whose xact_start precedes the moment
        # the freeze was visible has ended (committed or rolled back). This is a short poll of
        # pg_stat_activity (request transactions last milliseconds); one that runs longer than
        # DRAIN_TIMEOUT_SECONDS fails the move instead of blocking it forever.
        async with operator_transaction(self.source_url) as tx:
            self._frozen_at = await tx.fetchval("SELECT clock_timestamp()")
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        conn = await admin_connect(self.source_url)
        try:
            while True:
                cur = await conn.execute(
                    """SELECT array_agg(pid ORDER BY pid) AS pids FROM pg_stat_activity
                       WHERE datname = current_database() AND pid <> pg_backend_pid()
                         AND backend_type = 'client backend' AND xact_start < %s""",
                    (self._frozen_at,),
                )
                row = await cur.fetchone()
                older = row["pids"] if row else None
                if not older:
                    break
                if time.monotonic() > deadline:
                    await self._roll_back(f"transactions older than the freeze still run (pids {older})")
                    raise CopyFailed(
                        f"transactions that began before the freeze are still running in cell {m.from_cell} "
                        f"(pids {older}); the tenant stays writable there, try again later"
                    )
                await asyncio.sleep(DRAIN_POLL_SECONDS)
        finally:
            await conn.close()
        self._tick("freeze")

    # --- copy -----------------------------------------------------------------------------------
    async def _copy(self) -> dict[str, Any]:
        m = self.move
        await self._delete_target_copy()  # what a mover killed after the import's commit left
        ctx = TenantContext(tenant_id=m.tenant_id)
        seen: dict[str, Any] = {}

        async def in_snapshot(tx: Transaction, tables: list[portability.TableInfo]) -> None:
            # The same snapshot as the exported rows: the checksums describe exactly what is copied.
            seen["tables"] = tables
            seen["users"] = await portability.user_columns(tx, tables)
            seen["sums"] = await portability.table_checksums(tx, m.tenant_id, tables, seen["users"])

        with tempfile.TemporaryDirectory(prefix="iafactory-move-") as tmp:
            archive = Path(tmp) / f"{m.slug}.tar.gz"
            await portability.export_tenant(
                self.source_url,
                m.slug,
                archive,
                self._table_progress("export"),
                in_snapshot=in_snapshot,
                record_event=False,
                compresslevel=1,
            )
            manifest, files = portability.read_archive(archive)
        parsed = {t: _rows(files, t) for t in manifest["tables"]}
        tenant = manifest["tenant"]
        if tenant["id"] != str(m.tenant_id):
            raise CopyFailed(f"cell {m.from_cell} holds slug {m.slug} under another tenant id")
        tables, users_cols, source_sums = seen["tables"], seen["users"], seen["sums"]
        user_ids = {
            row[c]
            for t, cols in users_cols.items()
            for row in parsed.get(t, [])
            for c in cols
            if row.get(c) is not None
        }
        async with operator_transaction(self.source_url, ctx) as tx:
            people = await tx.fetch(
                """SELECT u.id, u.email, u.name, u.password_hash, u.is_active, u.created_at, u.email_verified_at,
                          EXISTS (SELECT 1 FROM tenant_users tu WHERE tu.tenant_id = %s AND tu.user_id = u.id) AS member
                   FROM users u WHERE u.id = ANY(%s) ORDER BY u.id""",
                (m.tenant_id, sorted(user_ids)),
            )
        async with operator_transaction(self.target_url, ctx, bulk=True) as tx:
            await tx.execute("INSERT INTO tenant_slugs (slug, tenant) VALUES (%s, %s)", (m.slug, m.tenant_id))
            await tx.execute(
                """INSERT INTO tenants (id, name, slug, region, plan, status, admin_email, admin_phone, settings,
                                        metadata, trial_ends_at, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (
                    m.tenant_id,
                    tenant["name"],
                    m.slug,
                    m.to_region,
                    tenant["plan"],
                    tenant["status"],
                    tenant.get("admin_email"),
                    tenant.get("admin_phone"),
                    Jsonb(tenant.get("settings") or {}),
                    Jsonb(tenant.get("metadata") or {}),
                    tenant.get("trial_ends_at"),
                    tenant["created_at"],
                ),
            )
            await tx.execute(
                "INSERT INTO tenant_freezes (frozen_tenant, reason, retry_after) VALUES (%s, %s, %s)",
                (m.tenant_id, f"moving in from cell {m.from_cell}", RETRY_AFTER_SECONDS),
            )
            id_map = await _accounts(tx, people)
            target_tables = await portability.tenant_tables(tx)
            if [t.name for t in target_tables] != [t.name for t in tables]:
                raise CopyFailed("the two cells do not have the same tenant tables: migrate both first")
            report = self._table_progress("import")
            for table in target_tables:
                rows = parsed.get(table.name, [])
                for row in rows:
                    for c in users_cols.get(table.name, []):
                        if row.get(c) is not None:
                            row[c] = id_map.get(row[c])
                await portability.insert_rows(tx, table, rows, report)
            target_sums = await portability.table_checksums(tx, m.tenant_id, target_tables, users_cols)
            differ = sorted(t for t in source_sums if source_sums[t] != target_sums.get(t))
            if differ:
                detail = ", ".join(
                    f"{t} ({source_sums[t]['rows']} rows in {m.from_cell}, "
                    f"{target_sums.get(t, {}).get('rows')} in {m.to_cell})"
                    for t in differ
                )
                raise CopyFailed(f"row counts or checksums differ after the copy: {detail}")
            self._tick("verify", len(source_sums), len(source_sums))
        _crash_after("imported")  # committed in the target, not yet in the journal
        return {
            "source": source_sums,
            "target": target_sums,
            "accounts": {str(k): v for k, v in id_map.items()},
            "members": [p["id"] for p in people if p["member"]],
        }

    def _table_progress(self, phase: str) -> portability.Progress:
        def update(table: str, done: int, total: int) -> None:
            self._tick(f"{phase} {table}", done, total)

        return update

    async def _delete_target_copy(self) -> None:
        """Remove whatever the target holds of the tenant (nothing, unless an earlier attempt's
        import committed before its journal entry). Only before the switch: the directory routes
        the tenant to the source until then."""
        m = self.move
        async with operator_transaction(self.target_url, TenantContext(tenant_id=m.tenant_id), bulk=True) as tx:
            if not await tx.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = %s)", (m.tenant_id,)):
                return
            for table in reversed(await portability.tenant_tables(tx)):
                await tx.execute(
                    sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(sql.Identifier(table.name)), (m.tenant_id,)
                )
            await _drop_tenant_row(tx, m.tenant_id)
            await tx.execute("DELETE FROM tenant_freezes WHERE frozen_tenant = %s", (m.tenant_id,))

    async def _roll_back(self, reason: str) -> None:
        m = self.move
        await self._delete_target_copy()
        async with operator_transaction(self.source_url) as tx:
            await tx.execute("DELETE FROM tenant_freezes WHERE frozen_tenant = %s", (m.tenant_id,))
            await tx.execute(
                "SELECT app.record_event(%s, 'tenant.move_failed', NULL, %s, NULL, NULL)",
                (m.tenant_id, Jsonb({"to_cell": m.to_cell, "reason": reason})),
            )
        async with operator_transaction(self.dir_url) as dtx:
            await dtx.execute(
                "UPDATE directory.tenants SET moving_to = NULL, updated_at = now() WHERE id = %s", (m.tenant_id,)
            )
            await self._record("failed", dtx, error=reason, unfrozen_at=await dtx.fetchval("SELECT now()"))

    # --- switch ---------------------------------------------------------------------------------
    async def _switch(self) -> None:
        m = self.move
        async with operator_transaction(self.target_url, TenantContext(tenant_id=m.tenant_id)) as tx:
            prefixes = [
                r["prefix"] for r in await tx.fetch("SELECT prefix FROM api_keys WHERE tenant_id = %s", (m.tenant_id,))
            ]
            emails = [
                r["email"]
                for r in await tx.fetch(
                    """SELECT u.email FROM tenant_users tu JOIN users u ON u.id = tu.user_id
                       WHERE tu.tenant_id = %s AND u.password_hash IS NOT NULL""",
                    (m.tenant_id,),
                )
            ]
            await tx.execute(
                "SELECT app.record_event(%s, 'tenant.moved_in', NULL, %s, NULL, NULL)",
                (
                    m.tenant_id,
                    Jsonb(
                        {
                            "from_cell": m.from_cell,
                            "to_cell": m.to_cell,
                            "from_region": m.from_region,
                            "to_region": m.to_region,
                            "checksums": m.checksums.get("target", {}),
                        }
                    ),
                ),
            )
        async with operator_transaction(self.dir_url) as dtx:
            await dtx.execute(
                "UPDATE directory.tenants SET cell = %s, region = %s, moving_to = NULL, updated_at = now() WHERE id = %s",
                (m.to_cell, m.to_region, m.tenant_id),
            )
            for prefix in prefixes:
                await dtx.execute(
                    """INSERT INTO directory.moved_api_keys (prefix, tenant_id, cell) VALUES (%s, %s, %s)
                       ON CONFLICT (prefix) DO UPDATE SET tenant_id = excluded.tenant_id, cell = excluded.cell""",
                    (prefix, m.tenant_id, m.to_cell),
                )
            for email in emails:
                await directory.record_login(dtx, self.settings, email, m.to_cell)
            await self._record("switched", dtx)
        self._tick("switch")

    # --- erase ----------------------------------------------------------------------------------
    async def _erase_source(self) -> None:
        m = self.move
        async with operator_transaction(self.source_url) as tx:
            present = await tx.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = %s)", (m.tenant_id,))
        members = list(m.checksums.get("members", []))
        if present:
            await portability.erase_tenant(
                self.source_url, m.slug, m.slug, reason=f"moved to cell {m.to_cell}", before=self._catch_up
            )
        async with operator_transaction(self.source_url, TenantContext(tenant_id=m.tenant_id), bulk=True) as tx:
            await _drop_tenant_row(tx, m.tenant_id)
            await tx.execute("DELETE FROM tenant_freezes WHERE frozen_tenant = %s", (m.tenant_id,))
        gone: list[str] = []
        if members:
            # People who belonged to no other tenant of this cell leave it with the tenant (their
            # account was created in the target); platform administrators stay. Row security off:
            # "no other membership" must be judged on every tenant's rows, and a role that row
            # security would filter gets an error here rather than a wrong answer.
            try:
                async with operator_transaction(self.source_url) as tx:
                    await tx.execute("SET LOCAL row_security = off")
                    gone = [
                        r["email"]
                        for r in await tx.fetch(
                            """DELETE FROM users u WHERE u.id = ANY(%s) AND NOT u.is_platform_admin
                                 AND NOT EXISTS (SELECT 1 FROM tenant_users tu WHERE tu.user_id = u.id)
                               RETURNING u.email""",
                            (members,),
                        )
                    ]
            except psycopg.errors.InsufficientPrivilege:
                self.say(f"note: the accounts of {m.slug}'s members stay in cell {m.from_cell} (no privilege to check)")
        if gone:
            async with operator_transaction(self.dir_url) as dtx:
                await dtx.execute(
                    "DELETE FROM directory.logins WHERE cell = %s AND email_hmac = ANY(%s)",
                    (m.from_cell, [directory.email_hash(self.settings, e) for e in gone]),
                )
        self._tick("erase source")

    async def _catch_up(self, tx: Transaction, tenant_id: UUID) -> None:
        """First in the source's erasure transaction. The freeze stops the tenant's writes, not the
        events the service records by itself while reads go on (a sign-in, a tenant selection):
        the audit log may have grown since the copy's snapshot. Locking the tenant row (FOR UPDATE
        conflicts with the key-share lock every insert referencing it takes) stops any more; the
        events the target lacks are then copied there (committed first: a failure after it leaves
        the source whole, and the next run finds them present)."""
        await tx.execute("SELECT 1 FROM tenants WHERE id = %s FOR UPDATE", (tenant_id,))
        rows = [
            r["line"]
            for r in await tx.fetch(
                "SELECT row_to_json(a)::text AS line FROM audit_events a WHERE tenant_id = %s ORDER BY created_at, id",
                (tenant_id,),
            )
        ]
        ctx = TenantContext(tenant_id=tenant_id)
        async with operator_transaction(self.target_url, ctx, bulk=True) as ttx:
            have = {
                str(r["id"]) for r in await ttx.fetch("SELECT id FROM audit_events WHERE tenant_id = %s", (tenant_id,))
            }
            missing = [json.loads(line) for line in rows]
            missing = [r for r in missing if r["id"] not in have]
            if missing:
                accounts = {int(k): v for k, v in self.move.checksums.get("accounts", {}).items()}
                for r in missing:
                    if r.get("actor_user_id") is not None:
                        r["actor_user_id"] = accounts.get(r["actor_user_id"])
                [table] = [t for t in await portability.tenant_tables(ttx) if t.name == "audit_events"]
                await portability.insert_rows(ttx, table, missing, None)


async def _drop_tenant_row(tx: Transaction, tenant_id: UUID) -> None:
    await tx.execute("DELETE FROM tenants WHERE id = %s", (tenant_id,))
    await tx.execute("DELETE FROM tenant_slugs WHERE tenant = %s", (tenant_id,))


async def _accounts(tx: Transaction, people: list[dict[str, Any]]) -> dict[int, int]:
    """source users.id → target users.id. A person with an account in the target (same email) keeps
    it; otherwise one is created: members with their password hash (they sign in there from now
    on), people only named in the tenant's history (e.g. a former member) without one."""
    id_map: dict[int, int] = {}
    for p in people:
        found = await tx.fetchval("SELECT id FROM users WHERE lower(email) = lower(%s)", (p["email"],))
        if found is None:
            found = await tx.fetchval(
                "INSERT INTO users (email, name, password_hash, is_active, created_at, email_verified_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (
                    p["email"],
                    p["name"],
                    p["password_hash"] if p["member"] else None,
                    p["is_active"],
                    p["created_at"],
                    p["email_verified_at"],
                ),
            )
        id_map[p["id"]] = found
    return id_map


def _rows(files: dict[str, bytes], table: str) -> list[dict[str, Any]]:
    data = files.get(f"tables/{table}.jsonl", b"")
    return [json.loads(line) for line in data.decode().splitlines() if line]
