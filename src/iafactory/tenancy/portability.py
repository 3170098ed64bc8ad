"""Data portability and the right to erasure (GDPR, Swiss nLPD, Algerian law 18-07).

Tables are discovered from the catalog (every table with `tenant_id`), ordered by their foreign
keys, so a table added later is exported, erased and imported without anyone remembering it.

Export: one consistent snapshot, one JSON line per row (PostgreSQL's own `row_to_json`, so every
type round-trips exactly), a manifest with row counts and SHA-256 per table, in a .tar.gz.
Erase: every row of the tenant, children first, in one transaction, then proof that no tenant
table holds a row of it, and a note in tenant_erasures. The tenant row itself stays (status and
contract history), so the tenant can be restored into.
Import: into an empty tenant, verified against the manifest, in one transaction.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.types.json import Jsonb

from iafactory.db.scope import Transaction, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext

FORMAT = "iafactory-tenant-export"
VERSION = 1
IMPORT_CHUNK = 500

Progress = Callable[[str, int, int], None]  # (table, rows done in table, rows in table)


class PortabilityError(Exception):
    """Refused; the message says why. Nothing was written."""


@dataclass(frozen=True)
class TableInfo:
    name: str
    primary_key: list[str]
    identity_column: str | None
    columns: list[str]


async def tenant_tables(tx: Transaction) -> list[TableInfo]:
    """Tenant tables, parents before children (foreign keys between tenant tables)."""
    rows = await tx.fetch(
        """SELECT c.relname AS name,
                  (SELECT array_agg(a.attname ORDER BY k.i) FROM pg_index ix
                          CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY k(n, i)
                          JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n
                   WHERE ix.indrelid = c.oid AND ix.indisprimary) AS pk,
                  (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attidentity <> ''
                   LIMIT 1) AS identity_column,
                  coalesce((SELECT array_agg(DISTINCT f.confrelid::regclass::text) FROM pg_constraint f
                            WHERE f.conrelid = c.oid AND f.contype = 'f' AND f.confrelid <> c.oid), '{}') AS refs,
                  (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           WHERE c.relkind IN ('r', 'p')
             AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'
                         AND NOT a.attisdropped)
           ORDER BY c.relname"""
    )
    by_name = {r["name"]: r for r in rows}
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in ordered or name in path:
            return
        for ref in by_name[name]["refs"]:
            if ref in by_name:
                visit(ref, (*path, name))
        ordered.append(name)

    for name in by_name:
        visit(name)
    return [
        TableInfo(n, list(by_name[n]["pk"] or []), by_name[n]["identity_column"], list(by_name[n]["columns"]))
        for n in ordered
    ]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _tenant(admin_url: str, slug: str) -> Any:
    async with operator_transaction(admin_url) as tx:
        try:
            return await service.get_tenant(tx, slug=slug)
        except service.TenantNotFound as err:
            raise PortabilityError(str(err)) from err


async def export_tenant(admin_url: str, slug: str, output: Path, progress: Progress | None = None) -> dict[str, Any]:
    tenant = await _tenant(admin_url, slug)
    ctx = TenantContext(tenant_id=tenant.id)
    files: dict[str, bytes] = {}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tenant": tenant.model_dump(mode="json"),
        "tables": {},
    }
    async with operator_transaction(admin_url, ctx, snapshot=True) as tx:
        tables = await tenant_tables(tx)
        for table in tables:
            order = sql.SQL(", ").join(map(sql.Identifier, table.primary_key or ["tenant_id"]))
            total = await tx.fetchval(
                sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(table.name)), (tenant.id,)
            )
            lines = []
            async with tx.connection.cursor(name=f"export_{table.name}") as cur:
                cur.itersize = 2000
                await cur.execute(
                    sql.SQL("SELECT row_to_json(t)::text AS line FROM {} t WHERE tenant_id = %s ORDER BY {}").format(
                        sql.Identifier(table.name), order
                    ),
                    (tenant.id,),
                )
                async for row in cur:
                    lines.append(row["line"])
                    if progress and len(lines) % 1000 == 0:
                        progress(table.name, len(lines), total)
            data = ("\n".join(lines) + ("\n" if lines else "")).encode()
            files[f"tables/{table.name}.jsonl"] = data
            manifest["tables"][table.name] = {"rows": len(lines), "sha256": _sha256(data)}
            if progress:
                progress(table.name, len(lines), total)
        users = await tx.fetch(
            """SELECT u.id, u.email, u.name FROM tenant_users tu JOIN users u ON u.id = tu.user_id
               WHERE tu.tenant_id = %s ORDER BY u.id""",
            (tenant.id,),
        )
    manifest["table_order"] = [t.name for t in tables]
    # Members' identities, for the person reading the export; import matches users by id.
    manifest["users"] = users
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    with tarfile.open(tmp, "w:gz") as archive:
        for name, data in [
            ("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode()),
            *files.items(),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            archive.addfile(info, io.BytesIO(data))
    tmp.replace(output)  # never a half-written archive under the final name
    async with operator_transaction(admin_url) as tx:
        await tx.execute(
            "SELECT app.record_event(%s, 'tenant.exported', NULL, %s, NULL, NULL)",
            (tenant.id, Jsonb({"tables": len(tables), "rows": sum(t["rows"] for t in manifest["tables"].values())})),
        )
    return manifest


async def count_rows(tx: Transaction, tenant_id: UUID, tables: list[TableInfo]) -> dict[str, int]:
    counts = {}
    for table in tables:
        counts[table.name] = await tx.fetchval(
            sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.Identifier(table.name)), (tenant_id,)
        )
    return counts


async def erase_tenant(admin_url: str, slug: str, confirm: str) -> dict[str, int]:
    if confirm != slug:
        raise PortabilityError(f"--confirm must repeat the slug exactly ({slug!r}) to erase it")
    tenant = await _tenant(admin_url, slug)
    if tenant.id == UUID(int=0):
        raise PortabilityError("the system-default tenant cannot be erased")
    async with operator_transaction(admin_url, TenantContext(tenant_id=tenant.id), bulk=True) as tx:
        tables = await tenant_tables(tx)
        deleted = {}
        for table in reversed(tables):  # children first
            deleted[table.name] = await tx.execute(
                sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(sql.Identifier(table.name)), (tenant.id,)
            )
        await tx.execute("DELETE FROM rate_counters WHERE subject = %s", (f"tenant:{tenant.id}",))
        left = {k: v for k, v in (await count_rows(tx, tenant.id, tables)).items() if v}
        if left:
            raise PortabilityError(f"rows remain after erasure, nothing was erased: {left}")
        await tx.execute(
            "INSERT INTO tenant_erasures (erased_tenant, slug, row_counts) VALUES (%s, %s, %s)",
            (tenant.id, tenant.slug, Jsonb(deleted)),
        )
    return deleted


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular file's content (extractfile gives None only for other kinds of member)."""
    f = archive.extractfile(member)
    if f is None:
        raise PortabilityError(f"{member.name}: not a regular file")
    return f.read()


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            if "manifest.json" not in members:
                raise PortabilityError(f"{path}: no manifest.json, not an IAFactory export")
            manifest = json.loads(_member_bytes(archive, members["manifest.json"]))
            files = {name: _member_bytes(archive, m) for name, m in members.items() if name.startswith("tables/")}
    except (tarfile.TarError, OSError, json.JSONDecodeError) as err:
        raise PortabilityError(f"{path}: cannot read the archive ({err})") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PortabilityError(f"{path}: not a version {VERSION} {FORMAT}")
    for table, meta in manifest["tables"].items():
        data = files.get(f"tables/{table}.jsonl")
        if data is None or _sha256(data) != meta["sha256"]:
            raise PortabilityError(f"{path}: tables/{table}.jsonl is missing or does not match its checksum")
    return manifest, files


async def import_tenant(
    admin_url: str, path: Path, into: str | None = None, progress: Progress | None = None
) -> dict[str, int]:
    manifest, files = read_archive(path)
    source_id = UUID(manifest["tenant"]["id"])
    tenant = await _tenant(admin_url, into or manifest["tenant"]["slug"])
    async with operator_transaction(admin_url, TenantContext(tenant_id=tenant.id), bulk=True) as tx:
        tables = await tenant_tables(tx)
        known = {t.name for t in tables}
        unknown = sorted(set(manifest["tables"]) - known)
        if unknown:
            raise PortabilityError(f"the export has tables this database does not: {', '.join(unknown)}")
        present = {k: v for k, v in (await count_rows(tx, tenant.id, tables)).items() if v}
        if present:
            raise PortabilityError(
                f"tenant {tenant.slug} is not empty ({present}); erase it first or import --into another, empty tenant"
            )
        imported: dict[str, int] = {}
        for table in tables:
            if table.name not in manifest["tables"]:
                continue
            rows = [json.loads(line) for line in files[f"tables/{table.name}.jsonl"].decode().splitlines() if line]
            for row in rows:
                if row.get("tenant_id") != str(source_id):
                    raise PortabilityError(f"{table.name}: a row belongs to another tenant than the export's")
                row["tenant_id"] = str(tenant.id)
            for start in range(0, len(rows), IMPORT_CHUNK):
                chunk = rows[start : start + IMPORT_CHUNK]
                # VALUES, one row per record, each read back by PostgreSQL's own JSON-to-row
                # conversion (every type round-trips); not INSERT ... SELECT, which a distributed
                # PostgreSQL refuses into a table with row security.
                record = sql.SQL("((jsonb_populate_record(NULL::{}, %s)).*)").format(sql.Identifier(table.name))
                await tx.execute(
                    sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
                        sql.Identifier(table.name),
                        sql.SQL(", ").join(map(sql.Identifier, table.columns)),
                        sql.SQL(", ").join([record] * len(chunk)),
                    ),
                    [Jsonb(r) for r in chunk],
                )
                if progress:
                    progress(table.name, start + len(chunk), len(rows))
            if progress and not rows:
                progress(table.name, 0, 0)
            if table.identity_column and rows:
                # Imported ids were explicit: move the sequence past them.
                await tx.fetchval(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({}, {}), greatest((SELECT max({}) FROM {}), 1))"
                    ).format(
                        sql.Literal(f"public.{table.name}"),
                        sql.Literal(table.identity_column),
                        sql.Identifier(table.identity_column),
                        sql.Identifier(table.name),
                    )
                )
            imported[table.name] = len(rows)
        counts = await count_rows(tx, tenant.id, tables)
        mismatched = {t: (counts.get(t), n) for t, n in imported.items() if counts.get(t) != n}
        if mismatched:
            raise PortabilityError(f"row counts differ after import, nothing was imported: {mismatched}")
    return imported
