"""What the database says about itself. Tenant tables are discovered here, never listed by hand,
so that verification, isolation tests, export and erasure cover a new table automatically."""

from __future__ import annotations

from dataclasses import dataclass

from iafactory.db.scope import Conn


@dataclass(frozen=True)
class TenantTable:
    name: str
    nullable: bool
    references_tenants: bool


async def table_exists(conn: Conn, name: str) -> bool:
    row = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS e", (f"public.{name}",))).fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    return bool(row["e"])


async def tenant_tables(conn: Conn) -> dict[str, TenantTable]:
    """Every ordinary table in `public` with a `tenant_id` column, by name."""
    cur = await conn.execute(
        """
        SELECT c.relname AS name, NOT a.attnotnull AS nullable,
               EXISTS (SELECT 1 FROM pg_constraint k
                       WHERE k.conrelid = c.oid AND k.contype = 'f'
                         AND k.confrelid = 'public.tenants'::regclass
                         AND k.conkey = ARRAY[a.attnum]) AS references_tenants
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p')
        ORDER BY c.relname
        """
    )
    rows = await cur.fetchall()
    # A table whose tenant_id references another tenant table (billing ledger → account) is still
    # anchored to tenants through it.
    out = {}
    for r in rows:
        refs = r["references_tenants"] or await _references_tenant_table(conn, r["name"])
        out[r["name"]] = TenantTable(r["name"], r["nullable"], refs)
    return out


async def _references_tenant_table(conn: Conn, table: str) -> bool:
    row = await (
        await conn.execute(
            """SELECT EXISTS (
               SELECT 1 FROM pg_constraint k
               JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
               JOIN pg_attribute fa ON fa.attrelid = k.confrelid AND fa.attnum = ANY (k.confkey)
               WHERE k.conrelid = %s::regclass AND k.contype = 'f'
                 AND a.attname = 'tenant_id' AND fa.attname = 'tenant_id') AS e""",
            (f"public.{table}",),
        )
    ).fetchone()
    assert row is not None
    return bool(row["e"])


async def valid_indexes(conn: Conn) -> set[str]:
    cur = await conn.execute(
        """SELECT c.relname AS name FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           WHERE i.indisvalid"""
    )
    return {r["name"] for r in await cur.fetchall()}
