"""Build a valid row for any tenant table from the catalog alone.

The isolation tests insert a row per tenant into every table that has `tenant_id`, without a
hand-kept list: a table added by a future migration is covered the day it appears. Values are
chosen from the column's type, from `CHECK (col IN (...))` lists, and from the referenced row for
foreign keys to other tenant tables. If a new table has a rule this cannot satisfy, the test
fails naming the table, which is the point.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from conftest import _drop_database, create_migrated_database, settings_for
from iafactory.db import server


@dataclass
class Column:
    name: str
    type: str
    not_null: bool
    has_default: bool
    max_length: int | None


@dataclass
class TableInfo:
    name: str
    columns: dict[str, Column]
    primary_key: list[str]
    enums: dict[str, list[str]] = field(default_factory=dict)
    # (local columns, referenced table, referenced columns) for FKs to other tenant tables
    references: list[tuple[list[str], str, list[str]]] = field(default_factory=list)
    # the same for FKs to global tables (users, tenants)
    global_references: list[tuple[list[str], str, list[str]]] = field(default_factory=list)


def load_tables(conn: psycopg.Connection) -> dict[str, TableInfo]:
    names = [
        r[0]
        for r in conn.execute(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"""
        )
    ]
    tables: dict[str, TableInfo] = {}
    for name in names:
        cols = {}
        for col, typ, notnull, hasdef, ident, maxlen in conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef,
                      a.attidentity <> '' OR a.attgenerated <> '',
                      CASE WHEN a.atttypmod > 4 AND a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype)
                           THEN a.atttypmod - 4 END
               FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum""",
            (name,),
        ):
            cols[col] = Column(col, typ, notnull, hasdef or ident, maxlen)
        pk = [
            r[0]
            for r in conn.execute(
                """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
               AND a.attnum = ANY (i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary""",
                (name,),
            )
        ]
        info = TableInfo(name, cols, pk)
        for (definition,) in conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (name,),
        ):
            m = re.match(r"CHECK \(\(\(?\(?(\w+)\)?(?:::\w+(?: \w+)?)?\)? = ANY \(+ARRAY\[(.*?)\]", definition)
            if m:
                info.enums[m.group(1)] = re.findall(r"'([^']*)'", m.group(2))
        for local, ref, remote in conn.execute(
            """SELECT (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n),
                      c.confrelid::regclass::text,
                      (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n)
               FROM pg_constraint c WHERE c.conrelid = %s::regclass AND c.contype = 'f'""",
            (name,),
        ):
            if ref in names and ref != name:
                info.references.append((list(local), ref, list(remote)))
            elif ref not in names:
                info.global_references.append((list(local), ref, list(remote)))
        tables[name] = info
    return tables


def insert_order(tables: dict[str, TableInfo]) -> list[str]:
    """Referenced tables first."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in order or name in path:
            return
        for _, ref, _ in tables[name].references:
            visit(ref, (*path, name))
        order.append(name)

    for name in tables:
        visit(name)
    return order


def sample_value(col: Column, enums: dict[str, list[str]]) -> Any:
    if col.name in enums:
        return enums[col.name][0]
    t = col.type
    if t.startswith(("character varying", "text", "character")):
        value = f"s{uuid.uuid4().hex[:10]}"
        return value[: col.max_length] if col.max_length else value
    if t in ("integer", "bigint", "smallint") or t.startswith("numeric"):
        return 1
    if t == "boolean":
        return True
    if t == "uuid":
        return uuid.uuid4()
    if t == "jsonb":
        return Jsonb({})
    if t.startswith("timestamp"):
        return "2026-01-01T00:00:00Z"
    if t == "date":
        return "2026-01-01"
    if t == "bytea":
        return bytes(32)
    if t == "regconfig":
        return "simple"
    if t == "tsvector":
        return ""
    raise AssertionError(f"catalog_rows cannot make a value of type {t} for column {col.name}")


def row_for(
    table: TableInfo,
    tenant_id: uuid.UUID,
    parents: dict[str, dict[str, Any]],
    global_rows: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Values for a new row of `table` belonging to `tenant_id`; `parents` holds a row of the
    same tenant for each referenced tenant table, `global_rows` a row of each global table
    (e.g. users) that a NOT NULL reference needs."""
    values: dict[str, Any] = {"tenant_id": tenant_id}
    for local, ref, remote in table.global_references:
        if ref == "tenants" or not all(table.columns[c].not_null for c in local):
            continue
        if not global_rows or ref not in global_rows:
            raise AssertionError(f"{table.name} needs a row of global table {ref}")
        for lc, rc in zip(local, remote, strict=True):
            values[lc] = global_rows[ref][rc]
    for local, ref, remote in table.references:
        parent = parents[ref]
        for lc, rc in zip(local, remote, strict=True):
            values[lc] = parent[rc]
    for col in table.columns.values():
        if col.name in values or (col.has_default and col.name not in table.primary_key) or not col.not_null:
            continue
        if col.has_default:
            continue
        values[col.name] = sample_value(col, table.enums)
    return values


# --- A database with a sample row of each tenant in every tenant table -------------------------------
# A fixture of the pytest plugin this module is (tests/conftest.py registers it).

TENANT_A = uuid.UUID("aaaaaaaa-0000-4000-8000-00000000000a")
TENANT_B = uuid.UUID("bbbbbbbb-0000-4000-8000-00000000000b")


def app_url(admin_url: str) -> str:
    # Direct even when the session runs the app's pool through PgBouncer: these are plain psycopg
    # connections (psycopg's own automatic prepared statements), checking the policies themselves.
    return server.app_direct_conninfo(settings_for(admin_url), admin_url)


def set_tenant(conn: psycopg.Connection, tenant: uuid.UUID | None) -> None:
    if tenant is not None:
        conn.execute(sql.SQL("SET LOCAL app.tenant_id = {}").format(sql.Literal(str(tenant))))


def pk_where(table: TableInfo, row: dict[str, Any]) -> tuple[sql.Composable, list[Any]]:
    cols = table.primary_key
    cond = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols)
    return cond, [row[c] for c in cols]


def insert_row(conn: psycopg.Connection, table: str, values: dict[str, Any]) -> dict[str, Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    if not values:
        return cur.execute(
            sql.SQL("INSERT INTO {} DEFAULT VALUES RETURNING *").format(sql.Identifier(table))
        ).fetchone()
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    return cur.execute(query, list(values.values())).fetchone()


def seed_tenant_rows(
    admin: str, tables: dict[str, TableInfo], tenant: uuid.UUID, global_rows: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """A row of `tenant` in every tenant table, inserted through the application role inside the
    tenant's own transaction (the owner for what the application may not write). Returns them."""
    parents: dict[str, dict[str, Any]] = {}
    with psycopg.connect(app_url(admin)) as conn:
        for table in insert_order(tables):
            # One committed transaction per row, so that rows the owner seeds can reference them.
            values = row_for(tables[table], tenant, parents, global_rows)
            try:
                with conn.transaction():
                    set_tenant(conn, tenant)
                    row = insert_row(conn, table, values)
            except psycopg.errors.InsufficientPrivilege:
                # Not writable by the application at all (e.g. the credit ledger, which
                # only definer functions write): seed it as the owner instead.
                with psycopg.connect(admin, autocommit=True) as owner:
                    row = insert_row(owner, table, values)
            except psycopg.errors.UniqueViolation:
                # One row per tenant that already exists (e.g. the billing account the
                # credit grant opened): use it.
                cond, params = pk_where(tables[table], values)
                with psycopg.connect(admin) as owner:
                    row = (
                        owner.cursor(row_factory=psycopg.rows.dict_row)
                        .execute(sql.SQL("SELECT * FROM {} WHERE {}").format(sql.Identifier(table), cond), params)
                        .fetchone()
                    )
            except psycopg.Error as err:
                raise AssertionError(f"cannot insert a sample row into {table}: {err}") from err
            parents[table] = row
    return parents


@pytest.fixture(scope="module")
def catalog_world(server_url: str, migrated_template: str) -> Iterator[dict[str, Any]]:
    """A migrated database with tenants A and B and, in every tenant table, a row of each,
    inserted through the application role inside each tenant's own transaction. One per test module
    (test_rls_isolation, test_portability)."""
    name, admin = create_migrated_database(server_url, migrated_template)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            for tid, slug in ((TENANT_A, "tenant-a"), (TENANT_B, "tenant-b")):
                conn.execute(
                    "INSERT INTO tenants (id, name, slug, region, plan, status) "
                    "VALUES (%s, %s, %s, 'CH', 'pro', 'active')",
                    (tid, slug, slug),
                )
                # Billable tables (e.g. pme_analyses) debit credits on insert.
                conn.execute("SELECT platform.grant_credits(%s, 1000, 'test credits', 'seed')", (tid,))
            tables = load_tables(conn)
            user_id = conn.execute(
                "INSERT INTO users (email, name) VALUES ('sample@example.ch', 'Sample') RETURNING id"
            ).fetchone()[0]
        global_rows = {"users": {"id": user_id}}
        rows: dict[str, dict[uuid.UUID, dict[str, Any]]] = {}
        for tenant in (TENANT_A, TENANT_B):
            for table, row in seed_tenant_rows(admin, tables, tenant, global_rows).items():
                rows.setdefault(table, {})[tenant] = row
        yield {"admin": admin, "app": app_url(admin), "tables": tables, "rows": rows, "globals": global_rows}
    finally:
        _drop_database(server_url, name)
