"""`iafactory citus distribute`: the migrated schema, spread over a Citus cluster by tenant.

Run against the coordinator after `iafactory migrate`. From the catalog (nothing listed by hand):

* `tenants` is distributed by `id`, and every tenant table (a table with `tenant_id`) by
  `tenant_id`, colocated with it: all of one tenant's rows live in one shard group, so a request
  (which names its tenant in every statement) goes to one node, and joins and foreign keys
  between tenant tables stay local to it;
* every other table of `public` becomes a reference table (a copy on each node: users, plans,
  billable actions, the slug registry ...), except LOCAL_TABLES, which stay on the coordinator;
* foreign keys from distributed to reference tables are dropped first and added back last:
  creating a reference table while plain tables still reference it would turn the whole
  foreign-key graph into "Citus local" tables;
* all of it in one transaction (sequential shard modifications, which foreign keys to reference
  tables require): a failure leaves the database as it was; a second run finds nothing to do.

And what the running service needs: `citus.propagate_set_commands = 'local'` (the SET LOCAL
of the tenant reaches the shards), `citus.enable_unsafe_triggers` (the tables' triggers run on
the shards, and later migrations may create triggers), and an owner role that can log in between
nodes: SECURITY DEFINER functions run as iaf_owner, and a definer function that reads several
shards opens connections to the workers as that role. Its password comes from
IAFACTORY_OWNER_DB_PASSWORD; on plain PostgreSQL iaf_owner stays NOLOGIN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from iafactory.config import Settings
from iafactory.db import migrate, server
from iafactory.db.scope import Conn, admin_connect

# Tables that stay on the coordinator, with the reason.
LOCAL_TABLES = {
    "schema_migrations": "the migration runner's own record, read and written on the coordinator only",
    "rate_counters": "per-minute request counters written by app.rate_hit on every request: an unlogged "
    "table on the coordinator (a reference table would write every node each time)",
    "login_throttle": "failed sign-in counters (unlogged), written on every failed sign-in: on the coordinator",
    "user_sessions": "sessions, read by the request gate on the coordinator, written on every refresh",
    "refresh_tokens": "refresh-token hashes, written on every refresh: on the coordinator",
    "security_events": "the platform's security log (no tenant): on the coordinator",
    "password_resets": "password-reset token hashes of people (no tenant): on the coordinator",
    "email_verifications": "email-verification token hashes of people (no tenant): on the coordinator",
    "email_outbox": "a queue claimed with FOR UPDATE SKIP LOCKED by the senders, a row per email and no tenant: "
    "on the coordinator (a reference table would write every node, and serialise the claims on a shard lock)",
}
SHARDED_BY_ID = "tenants"
OWNER_ROLE = "iaf_owner"

Progress = Callable[[str], None]


class CitusError(Exception):
    """Distribution refused; the message says why and what to do. Nothing was changed."""


@dataclass
class Plan:
    distributed: list[str] = field(default_factory=list)  # to distribute now, parents first
    reference: list[str] = field(default_factory=list)  # to make reference tables now
    foreign_keys: list[tuple[str, str, str]] = field(default_factory=list)  # (table, name, definition)
    already: dict[str, str] = field(default_factory=dict)  # table -> what it is already

    @property
    def empty(self) -> bool:
        return not (self.distributed or self.reference)


async def _citus_version(conn: Conn) -> str | None:
    row = await (await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'")).fetchone()
    return row["extversion"] if row else None


async def _tables(conn: Conn) -> dict[str, bool]:
    """Ordinary tables of public -> has tenant_id."""
    rows = await (
        await conn.execute(
            """SELECT c.relname AS name,
                  EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'
                          AND NOT a.attisdropped) AS tenant
           FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           ORDER BY c.relname"""
        )
    ).fetchall()
    return {r["name"]: r["tenant"] for r in rows}


async def _citus_tables(conn: Conn) -> dict[str, tuple[str, str | None, int | None]]:
    """table -> (citus_table_type, distribution column, colocation id) for tables of public."""
    rows = await (
        await conn.execute(
            """SELECT p.logicalrelid::regclass::text AS name, p.partmethod, p.repmodel, p.colocationid,
                  CASE WHEN p.partmethod = 'h' THEN column_to_column_name(p.logicalrelid, p.partkey) END AS col
           FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid
           WHERE c.relnamespace = 'public'::regnamespace"""
        )
    ).fetchall()
    kinds = {}
    for r in rows:
        kind = "distributed" if r["partmethod"] == "h" else "reference" if r["repmodel"] == "t" else "local"
        kinds[r["name"].removeprefix("public.")] = (kind, r["col"], r["colocationid"])
    return kinds


async def _foreign_keys(conn: Conn) -> list[dict[str, Any]]:
    return await (
        await conn.execute(
            """SELECT c.conname AS name, c.conrelid::regclass::text AS tbl, c.confrelid::regclass::text AS ref,
                  pg_get_constraintdef(c.oid) AS definition
           FROM pg_constraint c WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
           ORDER BY c.conrelid::regclass::text, c.conname"""
        )
    ).fetchall()


async def make_plan(conn: Conn) -> Plan:
    tables = await _tables(conn)
    if SHARDED_BY_ID not in tables:
        raise CitusError("no tenants table: run `iafactory migrate` first")
    current = await _citus_tables(conn)
    fks = await _foreign_keys(conn)
    plan = Plan()
    tenant_tables = [t for t, has in tables.items() if has]
    colocation = current.get(SHARDED_BY_ID, (None, None, None))[2]
    wanted: dict[str, tuple[str, str | None]] = {SHARDED_BY_ID: ("distributed", "id")}
    wanted |= dict.fromkeys(tenant_tables, ("distributed", "tenant_id"))
    wanted |= {
        t: ("reference", None) for t, has in tables.items() if not has and t != SHARDED_BY_ID and t not in LOCAL_TABLES
    }
    for table, (kind, column) in wanted.items():
        if table not in current:
            continue
        got_kind, got_column, got_colocation = current[table]
        colocated = kind != "distributed" or table == SHARDED_BY_ID or got_colocation == colocation
        if (got_kind, got_column) != (kind, column) or not colocated:
            what = f"{got_kind} by {got_column}" if got_column else got_kind
            raise CitusError(
                f"table {table} is already a {what} table, not {kind}{f' by {column}' if column else ''}"
                f"{'' if colocated else ' colocated with tenants'}: undo it (SELECT undistribute_table('{table}')) "
                "and run this again"
            )
        plan.already[table] = f"{kind} by {column}" if column else kind

    # Parents first: a foreign key between distributed tables needs its referenced table distributed.
    refs = {t: {fk["ref"] for fk in fks if fk["tbl"] == t and fk["ref"] in wanted and fk["ref"] != t} for t in wanted}
    ordered: list[str] = []

    def visit(t: str, path: tuple[str, ...] = ()) -> None:
        if t in ordered or t in path:
            return
        for r in sorted(refs[t]):
            visit(r, (*path, t))
        ordered.append(t)

    for t in [SHARDED_BY_ID, *sorted(wanted)]:
        visit(t)
    plan.distributed = [t for t in ordered if wanted[t][0] == "distributed" and t not in current]
    plan.reference = [t for t in ordered if wanted[t][0] == "reference" and t not in current]
    moving = set(plan.distributed)
    plan.foreign_keys = [
        (fk["tbl"], fk["name"], fk["definition"])
        for fk in fks
        if fk["tbl"] in moving and wanted.get(fk["ref"], ("",))[0] == "reference"
    ]
    return plan


async def _prepare_roles_and_settings(conn: Conn, settings: Settings, progress: Progress) -> None:
    password = settings.owner_db_password
    if password is None or not password.get_secret_value():
        raise CitusError(
            "IAFACTORY_OWNER_DB_PASSWORD is not set: on Citus the definer functions connect between nodes as "
            f"{OWNER_ROLE}, which needs a password to log in (plain PostgreSQL keeps it NOLOGIN)"
        )
    dbname = conn.info.dbname
    owner_secret = password.get_secret_value()
    await conn.execute(
        sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(OWNER_ROLE), sql.Literal(owner_secret))
    )
    # How the nodes authenticate to each other as these roles (nodeid 0: towards every node).
    # Citus does not copy pg_dist_authinfo to the workers, whose shard triggers connect onwards too.
    credentials = [(OWNER_ROLE, owner_secret)]
    app_secret = server.app_login_password(settings)
    if app_secret:
        credentials.append((settings.app_db_user, app_secret))
    for role, secret in credentials:
        statements = sql.SQL(
            "DELETE FROM pg_dist_authinfo WHERE nodeid = 0 AND rolename = {role}; "
            "INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo) VALUES (0, {role}, {info})"
        ).format(role=sql.Literal(role), info=sql.Literal(make_conninfo(password=secret)))
        text = statements.as_string(conn)
        await conn.execute(text)
        failed = await (
            await conn.execute(
                "SELECT nodename, nodeport, result FROM run_command_on_workers(%s) WHERE NOT success", (text,)
            )
        ).fetchall()
        if failed:
            raise CitusError(
                f"cannot record node credentials on worker {failed[0]['nodename']}:{failed[0]['nodeport']}: "
                f"{failed[0]['result']}"
            )
    progress(f"{OWNER_ROLE} may log in between nodes; node credentials for {', '.join(r for r, _ in credentials)}")
    for name, value in (("citus.propagate_set_commands", "local"), ("citus.enable_unsafe_triggers", "on")):
        await conn.execute(
            sql.SQL("ALTER DATABASE {} SET {} TO {}").format(sql.Identifier(dbname), sql.SQL(name), sql.Literal(value))
        )
    # This login runs the later migrations: one that alters distributed tables and then creates a
    # function in the same transaction is refused unless Citus uses one connection per node.
    await conn.execute(
        sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET citus.multi_shard_modify_mode TO 'sequential'").format(
            sql.Identifier(dbname)
        )
    )
    progress(f"database {dbname}: citus.propagate_set_commands = local, citus.enable_unsafe_triggers = on")


async def distribute(
    conninfo: str, settings: Settings, progress: Progress = lambda _: None, shard_count: int | None = None
) -> Plan:
    """Distribute what is not distributed yet. Returns the plan it carried out (empty: nothing to do)."""
    async with await admin_connect(conninfo) as conn:
        version = await _citus_version(conn)
        if version is None:
            raise CitusError(
                f"citus is not installed in database {conn.info.dbname!r}: this command runs on a Citus "
                "coordinator (CREATE EXTENSION citus there and on every worker, then SELECT citus_add_node(...))"
            )
        coordinator = await (await conn.execute("SELECT citus_is_coordinator() AS c")).fetchone()
        if not (coordinator and coordinator["c"]):
            raise CitusError("this node is not the Citus coordinator: point DATABASE_URL at the coordinator")
        pending = [s.version for s in await migrate.status(conn) if s.state != "applied"]
        if pending:
            raise CitusError(f"migrations not applied ({', '.join(pending)}): run `iafactory migrate` first")
        nodes = await (
            await conn.execute(
                "SELECT count(*) AS n FROM pg_dist_node WHERE noderole = 'primary' AND isactive AND groupid <> 0"
            )
        ).fetchone()
        workers = nodes["n"] if nodes else 0
        progress(f"Citus {version}, {workers} worker(s)")
        if workers == 0:
            progress(
                "warning: no worker registered (SELECT citus_add_node(host, port)): shards stay on the coordinator"
            )
        await _prepare_roles_and_settings(conn, settings, progress)

        plan = await make_plan(conn)
        if plan.empty:
            progress(f"nothing to do: {len(plan.already)} tables already distributed or reference tables")
            return plan
        async with conn.transaction():
            await conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
            await conn.execute("SET LOCAL citus.enable_unsafe_triggers TO on")
            # Existing rows are copied into the shards, not inserted anew: no trigger may run on
            # them (an audit event, a debit, an indexing job for each copied row).
            await conn.execute("SET LOCAL citus.propagate_set_commands TO 'local'")
            await conn.execute("SET LOCAL session_replication_role TO 'replica'")
            for table, name, _ in plan.foreign_keys:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
                )
            # Reference tables first (nothing references them now): the shards' triggers read some.
            for table in plan.reference:
                progress(f"reference table {table}")
                await conn.execute("SELECT create_reference_table(%s)", (f"public.{table}",))
            for table in plan.distributed:
                column = "id" if table == SHARDED_BY_ID else "tenant_id"
                progress(f"distributing {table} by {column}")
                if table == SHARDED_BY_ID:
                    await conn.execute(
                        "SELECT create_distributed_table(%s, %s, shard_count => %s)",
                        (f"public.{table}", column, shard_count or 32),
                    )
                else:
                    await conn.execute(
                        "SELECT create_distributed_table(%s, %s, colocate_with => %s)",
                        (f"public.{table}", column, f"public.{SHARDED_BY_ID}"),
                    )
            for table, name, definition in plan.foreign_keys:
                progress(f"foreign key {table}.{name} again")
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                        sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)
                    )
                )
        # The rows now live in the shards; the coordinator's own copy only takes space.
        for table in [*plan.distributed, *plan.reference]:
            try:
                await conn.execute("SELECT truncate_local_data_after_distributing_table(%s)", (f"public.{table}",))
            except psycopg.Error as err:
                progress(f"note: the coordinator keeps a copy of {table}'s old rows ({err.diag.message_primary})")
        progress(f"done: {len(plan.distributed)} distributed, {len(plan.reference)} reference tables")
        return plan
