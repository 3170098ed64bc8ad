"""Data portability and the right to erasure (GDPR, Swiss nLPD, Algerian law 18-07).

Tables are discovered from the catalog (every table with `tenant_id`), ordered by their foreign
keys, so a table added later is exported, erased and imported without anyone remembering it.

Export: one consistent snapshot, one JSON line per row (PostgreSQL's own `row_to_json`, so every
type round-trips exactly), a manifest with row counts and SHA-256 per table, in a .tar.gz.
Erase: every row of the tenant, children first, in one transaction, then proof that no tenant
table holds a row of it, and a note in tenant_erasures. The tenant row itself stays (status and
contract history), so the tenant can be restored into.
Import: verified against the manifest, in one transaction; either back into the export's own
tenant (which must be empty, e.g. erased), or `--into` a new slug: a copy, next to the original.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID, uuid4

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from iafactory.config import Settings
from iafactory.db.scope import Transaction, operator_transaction
from iafactory.knowledge import large
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext
from iafactory.tenancy.schemas import TenantCreate

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


def new_manifest(tenant: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An export's manifest before its tables (`extra`: e.g. who exported it)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
        "tenant": tenant,
        "tables": {},
    }


def add_table(manifest: dict[str, Any], files: dict[str, bytes], name: str, lines: list[str]) -> None:
    """One table's rows (JSON lines) into the archive's files, counted and hashed in the manifest."""
    data = ("\n".join(lines) + ("\n" if lines else "")).encode()
    files[f"tables/{name}.jsonl"] = data
    manifest["tables"][name] = {"rows": len(lines), "sha256": _sha256(data)}


def write_archive(fileobj: BinaryIO, manifest: dict[str, Any], files: dict[str, bytes], compresslevel: int) -> None:
    """The .tar.gz: the manifest first, then the tables' files."""
    with tarfile.open(fileobj=fileobj, mode="w:gz", compresslevel=compresslevel) as archive:
        for name, data in [
            ("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode()),
            *files.items(),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            archive.addfile(info, io.BytesIO(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _tenant(admin_url: str, slug: str) -> Any:
    async with operator_transaction(admin_url) as tx:
        try:
            return await service.get_tenant(tx, slug=slug)
        except service.TenantNotFound as err:
            raise PortabilityError(str(err)) from err


SnapshotHook = Callable[[Transaction, list[TableInfo]], Awaitable[None]]


async def export_tenant(
    admin_url: str,
    slug: str,
    output: Path,
    progress: Progress | None = None,
    *,
    in_snapshot: SnapshotHook | None = None,
    record_event: bool = True,
    compresslevel: int = 9,
) -> dict[str, Any]:
    """`in_snapshot` runs in the export's own snapshot, after the rows are read (a move computes
    its checksums there). `record_event`: audit the export (a move audits itself). `compresslevel`:
    gzip's, 1 for an archive read back at once (a move)."""
    tenant = await _tenant(admin_url, slug)
    ctx = TenantContext(tenant_id=tenant.id)
    files: dict[str, bytes] = {}
    manifest = new_manifest(tenant.model_dump(mode="json"))
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
            add_table(manifest, files, table.name, lines)
            if progress:
                progress(table.name, len(lines), total)
        if in_snapshot is not None:
            await in_snapshot(tx, tables)
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
    with tmp.open("wb") as out:
        write_archive(out, manifest, files, compresslevel)
    tmp.replace(output)  # never a half-written archive under the final name
    if not record_event:
        return manifest
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


async def erase_tenant(
    admin_url: str,
    slug: str,
    confirm: str,
    *,
    reason: str | None = None,
    before: Callable[[Transaction, UUID], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """`before` runs first in the erasure's transaction (a move copies what was appended since)."""
    if confirm != slug:
        raise PortabilityError(f"--confirm must repeat the slug exactly ({slug!r}) to erase it")
    tenant = await _tenant(admin_url, slug)
    if tenant.id == UUID(int=0):
        raise PortabilityError("the system-default tenant cannot be erased")
    async with operator_transaction(admin_url, TenantContext(tenant_id=tenant.id), bulk=True) as tx:
        if before is not None:
            await before(tx, tenant.id)
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
            "INSERT INTO tenant_erasures (erased_tenant, slug, row_counts, reason) VALUES (%s, %s, %s, %s)",
            (tenant.id, tenant.slug, Jsonb(deleted), reason),
        )
    # A large tenant's own search indexes (031) go with its rows: dropped concurrently, after the
    # erasure committed (a DROP INDEX in its transaction would wait for every search of the table).
    await large.drop_tenant_indexes(admin_url, tenant.id)
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


def _copy_of(source: dict[str, Any], slug: str) -> TenantCreate:
    """The new tenant of a copy: the exported tenant's attributes under `slug`, checked like
    `tenants create` input."""
    try:
        return TenantCreate.model_validate({**{k: source.get(k) for k in TenantCreate.model_fields}, "slug": slug})
    except ValidationError as err:
        first = err.errors()[0]
        where = "--into" if first["loc"] == ("slug",) else f"the export's tenant {'.'.join(map(str, first['loc']))}"
        raise PortabilityError(
            f"{where}: {first['msg'].removeprefix('Value error, ')} (got {first['input']!r})"
        ) from err


async def _create_copy(tx: Transaction, tenant_id: UUID, data: TenantCreate) -> None:
    """Writes the copy's tenant row in the import's own transaction, so that a failed import leaves
    no tenant behind. Not platform.tenant_create: it picks the id itself, and the transaction must
    act as the new tenant (row security) from its first statement. The slug registry row comes
    first, as there (its primary key is what refuses a taken slug); in bulk mode no
    `tenant.created` audit row is written: the copy's audit log is the exported one."""
    try:
        await tx.execute("INSERT INTO tenant_slugs (slug, tenant) VALUES (%s, %s)", (data.slug, tenant_id))
    except psycopg.errors.UniqueViolation as err:
        raise PortabilityError(
            f"--into: slug {data.slug!r} is already taken; --into creates a new tenant "
            "(without --into the export goes back into its own, empty tenant)"
        ) from err
    await tx.execute(
        """INSERT INTO tenants (id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata,
                                trial_ends_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (tenant_id, *service.tenant_values(data)),
    )


async def insert_rows(tx: Transaction, table: TableInfo, rows: list[dict[str, Any]], progress: Progress | None) -> None:
    """Insert exported rows (as read back from JSON) into `table`, keeping their ids."""
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
        # Imported ids were explicit: move the sequence past them, never back. The sequence
        # serves every tenant, and max() may see only this one (row security): moving it
        # back would hand out ids that other tenants' rows already have.
        await tx.fetchval(
            sql.SQL(
                "SELECT setval(s, greatest((SELECT max({}) FROM {}), pg_sequence_last_value(s), 1))"
                " FROM (SELECT pg_get_serial_sequence({}, {})::regclass AS s) seq"
            ).format(
                sql.Identifier(table.identity_column),
                sql.Identifier(table.name),
                sql.Literal(f"public.{table.name}"),
                sql.Literal(table.identity_column),
            )
        )


COPIED_KEY_PREFIX = "copy_"


def _disable_copied_key(row: dict[str, Any], now: str) -> None:
    """An API key finds its tenant by its prefix alone, across tenants (app.authenticate_api_key),
    and the prefix is unique only per tenant (a distributed table's unique keys include
    tenant_id). A copied prefix would let the original's keys resolve to either tenant, so the
    copy keeps its keys as revoked records under a prefix no key has (keys start with `iaf_`)."""
    if not row["prefix"].startswith(COPIED_KEY_PREFIX):
        row["prefix"] = COPIED_KEY_PREFIX + row["prefix"]
    row["revoked_at"] = row["revoked_at"] or now


def _disable_copied_invitation(row: dict[str, Any], now: str) -> None:
    """An invitation's token finds its tenant by the token's hash alone (app.find_invitation): the
    copy keeps its invitations as revoked records whose hash no token has."""
    row["token_hash"] = "\\x" + secrets.token_hex(32)
    if row.get("accepted_at") is None:
        row["revoked_at"] = row.get("revoked_at") or now


async def import_tenant(
    admin_url: str,
    path: Path,
    into: str | None = None,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Restores an export into its own tenant (found by slug, and empty), or with `into` copies it
    into a new tenant of that slug while the original stays. A copy keeps the rows' own ids: every
    key and unique constraint of a tenant table includes tenant_id (migrations 007/019), so the
    ids repeat per tenant without colliding, and foreign keys between tenant tables, composite
    with tenant_id, stay within the copy. References to global tables (members' users) are kept.
    Bulk mode: no plan limit, no debit, no audit row from triggers, so balance, ledger and audit
    log are the exported ones."""
    manifest, files = read_archive(path)
    source_id = UUID(manifest["tenant"]["id"])
    copy = _copy_of(manifest["tenant"], into) if into is not None else None
    if copy is None:
        tenant = await _tenant(admin_url, manifest["tenant"]["slug"])
        tenant_id, slug = tenant.id, tenant.slug
    else:
        tenant_id, slug = uuid4(), copy.slug
    now = datetime.now(UTC).isoformat()
    async with operator_transaction(admin_url, TenantContext(tenant_id=tenant_id), bulk=True) as tx:
        if copy is not None:
            await _create_copy(tx, tenant_id, copy)
        tables = await tenant_tables(tx)
        known = {t.name for t in tables}
        unknown = sorted(set(manifest["tables"]) - known)
        if unknown:
            raise PortabilityError(f"the export has tables this database does not: {', '.join(unknown)}")
        present = {k: v for k, v in (await count_rows(tx, tenant_id, tables)).items() if v}
        if present:
            raise PortabilityError(
                f"tenant {slug} is not empty ({present}); erase it first or import --into a new slug"
            )
        imported: dict[str, int] = {}
        for table in tables:
            if table.name not in manifest["tables"]:
                continue
            rows = [json.loads(line) for line in files[f"tables/{table.name}.jsonl"].decode().splitlines() if line]
            for row in rows:
                if row.get("tenant_id") != str(source_id):
                    raise PortabilityError(f"{table.name}: a row belongs to another tenant than the export's")
                row["tenant_id"] = str(tenant_id)
                if copy is not None and table.name == "api_keys":
                    _disable_copied_key(row, now)
                if copy is not None and table.name == "invitations":
                    _disable_copied_invitation(row, now)
            await insert_rows(tx, table, rows, progress)
            imported[table.name] = len(rows)
        counts = await count_rows(tx, tenant_id, tables)
        mismatched = {t: (counts.get(t), n) for t, n in imported.items() if counts.get(t) != n}
        if mismatched:
            raise PortabilityError(f"row counts differ after import, nothing was imported: {mismatched}")
    # A large tenant gets its own search indexes back (031), built concurrently after the commit.
    await large.reconcile(admin_url, settings, tenant_id=tenant_id)
    return imported


# Columns of tenant tables that hold a users.id without a foreign key (history: the user may be gone).
USER_COLUMNS_WITHOUT_FK = {
    ("usage_events", "user_id"),
    ("credit_transactions", "created_by"),
    ("audit_events", "actor_user_id"),
}


async def user_columns(tx: Transaction, tables: list[TableInfo]) -> dict[str, list[str]]:
    """Per tenant table, its columns holding a users.id: foreign keys to users, and the history
    columns above. users.id is an identity of each database, so these are the columns a move
    between cells must translate (every other id is the tenant's own, kept as it is)."""
    rows = await tx.fetch(
        """SELECT c.conrelid::regclass::text AS t, a.attname::text AS col FROM pg_constraint c
           JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
           WHERE c.contype = 'f' AND c.confrelid = 'public.users'::regclass AND cardinality(c.conkey) = 1"""
    )
    found = {(r["t"], r["col"]) for r in rows} | USER_COLUMNS_WITHOUT_FK
    out: dict[str, list[str]] = {}
    for table in tables:
        cols = sorted(col for t, col in found if t == table.name and col in table.columns)
        if cols:
            out[table.name] = cols
    return out


async def table_checksums(
    tx: Transaction, tenant_id: UUID, tables: list[TableInfo], users: dict[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Per table: the tenant's row count and a SHA-256 of its rows, computed by the database in a
    form that does not depend on the database: each row as jsonb text (keys sorted by jsonb
    itself; time zone, float and interval output fixed below), with every users.id replaced by
    that user's email (user ids are per cell), hashed one by one; the table's digest is the
    SHA-256 of those row digests in byte order (no collation involved). Two cells holding the same
    rows give the same digests."""
    await tx.execute("SET LOCAL TimeZone = 'UTC'")
    await tx.execute("SET LOCAL extra_float_digits = 1")
    await tx.execute("SET LOCAL IntervalStyle = 'iso_8601'")
    await tx.execute("SET LOCAL bytea_output = 'hex'")
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        cols = users.get(table.name, [])
        canon: sql.Composable = sql.SQL("to_jsonb(t)")
        if cols:
            canon = sql.SQL("to_jsonb(t) || jsonb_build_object({})").format(
                sql.SQL(", ").join(
                    sql.SQL("{}, (SELECT u.email FROM public.users u WHERE u.id = t.{})").format(
                        sql.Literal(c), sql.Identifier(c)
                    )
                    for c in cols
                )
            )
        row = await tx.fetchrow(
            sql.SQL(
                "SELECT count(*) AS rows, encode(sha256(coalesce(string_agg(h, ''::bytea ORDER BY h), ''::bytea)), 'hex')"
                " AS sha256 FROM (SELECT sha256(convert_to(({})::text, 'UTF8')) AS h FROM {} t WHERE t.tenant_id = %s) s"
            ).format(canon, sql.Identifier(table.name)),
            (tenant_id,),
        )
        assert row is not None  # an aggregate always returns a row
        out[table.name] = {"rows": row["rows"], "sha256": row["sha256"]}
    return out
