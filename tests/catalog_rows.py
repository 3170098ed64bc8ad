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
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


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
    names = [r[0] for r in conn.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1""")]
    tables: dict[str, TableInfo] = {}
    for name in names:
        cols = {}
        for col, typ, notnull, hasdef, ident, maxlen in conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef,
                      a.attidentity <> '' OR a.attgenerated <> '',
                      CASE WHEN a.atttypmod > 4 AND a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype)
                           THEN a.atttypmod - 4 END
               FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum""", (name,)):
            cols[col] = Column(col, typ, notnull, hasdef or ident, maxlen)
        pk = [r[0] for r in conn.execute(
            """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
               AND a.attnum = ANY (i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary""", (name,))]
        info = TableInfo(name, cols, pk)
        for (definition,) in conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (name,)):
            m = re.match(r"CHECK \(\(\(?\(?(\w+)\)?(?:::\w+(?: \w+)?)?\)? = ANY \(+ARRAY\[(.*?)\]", definition)
            if m:
                info.enums[m.group(1)] = re.findall(r"'([^']*)'", m.group(2))
        for local, ref, remote in conn.execute(
            """SELECT (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n),
                      c.confrelid::regclass::text,
                      (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n)
               FROM pg_constraint c WHERE c.conrelid = %s::regclass AND c.contype = 'f'""", (name,)):
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
            visit(ref, path + (name,))
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
    table: TableInfo, tenant_id: uuid.UUID, parents: dict[str, dict[str, Any]],
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
        for lc, rc in zip(local, remote):
            values[lc] = global_rows[ref][rc]
    for local, ref, remote in table.references:
        parent = parents[ref]
        for lc, rc in zip(local, remote):
            values[lc] = parent[rc]
    for col in table.columns.values():
        if col.name in values or (col.has_default and col.name not in table.primary_key) or not col.not_null:
            continue
        if col.has_default:
            continue
        values[col.name] = sample_value(col, table.enums)
    return values
