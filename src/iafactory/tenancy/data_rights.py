"""A tenant's own data rights, through the tenant's own transaction (the application role, under
row security): the export of its data as an archive, and the erasure request that a platform
administrator confirms before an operator erases (portability.erase_tenant needs operator rights).

Export: the same archive as `iafactory tenants export` (portability.py: format, manifest, one
JSON line per row, SHA-256 per table), so `iafactory tenants import` restores it. Every tenant
table is read by ONE statement (a UNION ALL, each branch `WHERE tenant_id = %s`): one statement
sees one snapshot, so the archive is consistent although the request's transaction is READ
COMMITTED (the tenant prelude runs before any statement, so REPEATABLE READ cannot be asked for).
The application role may read every tenant table (tests/test_console.py checks that no table is
left out); the tenant row is read through the tenant's own policy and the members' identities
through the members service, as the operator's export writes them.

Erasure requests live in the tenant's cell (erasure_requests, 034): at most one open (pending or
confirmed) per tenant. The owner records and cancels; `platform.confirm_erasure_request`
confirms (platform administrators); `iafactory tenants erase SLUG --confirm SLUG
--confirmed-request` erases, refusing without a confirmed request.
"""

from __future__ import annotations

import io
import json
from typing import Any
from uuid import UUID

from psycopg import sql

from iafactory.audit import service as audit
from iafactory.db.scope import Transaction
from iafactory.tenancy import portability

REQUEST_COLUMNS = "id, status, reason, requested_by, created_at, decided_by, decided_at"


class ErasureRequestError(Exception):
    """Refused; the message says why. `status`: the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- export --------------------------------------------------------------------------------------


async def export_rows(tx: Transaction, tenant_id: UUID) -> tuple[list[portability.TableInfo], dict[str, list[str]]]:
    """Every row of every tenant table, as JSON text, in primary-key order, from one snapshot."""
    tables = await portability.tenant_tables(tx)
    branches = [
        sql.SQL(
            "SELECT {} AS t, row_number() OVER (ORDER BY {}) AS n, row_to_json(x)::text AS line FROM {} x WHERE x.tenant_id = %s"
        ).format(
            sql.Literal(i),
            sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(c)) for c in (table.primary_key or ["tenant_id"])),
            sql.Identifier(table.name),
        )
        for i, table in enumerate(tables)
    ]
    query = sql.SQL("SELECT t, line FROM ({}) rows ORDER BY t, n").format(sql.SQL(" UNION ALL ").join(branches))
    rows = await tx.fetch(query, [tenant_id] * len(tables))
    lines: dict[str, list[str]] = {table.name: [] for table in tables}
    for row in rows:
        lines[tables[row["t"]].name].append(row["line"])
    return tables, lines


async def export_archive(
    tx: Transaction,
    tenant_id: UUID,
    tenant: dict[str, Any],
    members: list[dict[str, Any]],
    *,
    user_id: int | None,
    ip: str | None,
    request_id: str | None,
) -> tuple[bytes, dict[str, Any]]:
    """The tenant's export (.tar.gz bytes) and its manifest; audited as `tenant.exported` in the
    same transaction (with who asked)."""
    tables, lines = await export_rows(tx, tenant_id)
    files: dict[str, bytes] = {}
    manifest = portability.new_manifest(
        json.loads(json.dumps(tenant, default=str)), exported_by={"kind": "tenant", "user_id": user_id}
    )
    for table in tables:
        portability.add_table(manifest, files, table.name, lines[table.name])
    manifest["table_order"] = [t.name for t in tables]
    manifest["users"] = [{"id": m["user_id"], "email": m["email"], "name": m["name"]} for m in members]
    buffer = io.BytesIO()
    portability.write_archive(buffer, manifest, files, compresslevel=6)
    total = sum(t["rows"] for t in manifest["tables"].values())
    await audit.record(
        tx,
        tenant_id,
        "tenant.exported",
        user_id=user_id,
        details={"tables": len(tables), "rows": total, "by": "tenant"},
        ip=ip,
        request_id=request_id,
    )
    return buffer.getvalue(), manifest


# --- erasure requests (the tenant) ------------------------------------------------------------


async def erasure_requests(tx: Transaction, tenant_id: UUID, limit: int = 50) -> list[dict[str, Any]]:
    """The tenant's requests, newest first."""
    return await tx.fetch(
        f"SELECT {REQUEST_COLUMNS} FROM erasure_requests WHERE tenant_id = %s ORDER BY created_at DESC, id DESC "
        "LIMIT %s",
        (tenant_id, limit),
    )


async def open_request(tx: Transaction, tenant_id: UUID) -> dict[str, Any] | None:
    return await tx.fetchrow(
        f"SELECT {REQUEST_COLUMNS} FROM erasure_requests WHERE tenant_id = %s AND status IN ('pending', 'confirmed')",
        (tenant_id,),
    )


async def request_erasure(
    tx: Transaction, tenant_id: UUID, *, user_id: int | None, reason: str, ip: str | None, request_id: str | None
) -> tuple[dict[str, Any], bool]:
    """Records a pending request, unless one is open already: (the open request, created now?).
    Audited as `tenant.erasure_requested`."""
    row = await tx.fetchrow(
        f"""INSERT INTO erasure_requests (tenant_id, reason, requested_by) VALUES (%s, %s, %s)
            ON CONFLICT (tenant_id) WHERE status IN ('pending', 'confirmed') DO NOTHING
            RETURNING {REQUEST_COLUMNS}""",
        (tenant_id, reason, user_id),
    )
    if row is None:
        existing = await open_request(tx, tenant_id)
        assert existing is not None
        return existing, False
    await audit.record(
        tx,
        tenant_id,
        "tenant.erasure_requested",
        user_id=user_id,
        details={"request": str(row["id"]), "reason": reason},
        ip=ip,
        request_id=request_id,
    )
    return row, True


async def cancel_erasure_request(
    tx: Transaction, tenant_id: UUID, *, user_id: int | None, ip: str | None, request_id: str | None
) -> dict[str, Any]:
    """Cancels the tenant's pending request (404 without one; 409 once confirmed: the platform
    has agreed, ask it). Audited as `tenant.erasure_cancelled`."""
    current = await open_request(tx, tenant_id)
    if current is None:
        raise ErasureRequestError(404, "no open erasure request")
    if current["status"] != "pending":
        raise ErasureRequestError(409, "the erasure request is confirmed already; ask the platform's administrators")
    row = await tx.fetchrow(
        f"""UPDATE erasure_requests SET status = 'cancelled' WHERE tenant_id = %s AND id = %s AND status = 'pending'
            RETURNING {REQUEST_COLUMNS}""",
        (tenant_id, current["id"]),
    )
    if row is None:
        raise ErasureRequestError(409, "the erasure request changed meanwhile; reload")
    await audit.record(
        tx,
        tenant_id,
        "tenant.erasure_cancelled",
        user_id=user_id,
        details={"request": str(row["id"])},
        ip=ip,
        request_id=request_id,
    )
    return row


# --- erasure requests (the platform) ------------------------------------------------------------
# For the platform's pages and routes (a platform administrator's transaction with no tenant, in
# the cell holding the tenants: auth.dependencies.user_transaction) and the operator's command.


async def pending_erasure_requests(tx: Transaction, status: str | None = "pending") -> list[dict[str, Any]]:
    """Requests of every tenant of the transaction's cell (oldest first), `status` None for all:
    tenant_id, id, slug, tenant_name, status, reason, requested_by(_email), created_at,
    decided_by, decided_at. Platform administrators and operators only (IA403 otherwise)."""
    return await tx.fetch("SELECT * FROM platform.erasure_requests(%s)", (status,))


async def confirm_erasure_request(tx: Transaction, tenant_id: UUID, user_id: int | None) -> dict[str, Any] | None:
    """Confirms the tenant's pending request (a confirmed one stays so): {id, status} of its open
    request after the call, None when it has none. Audited in the tenant's log as
    `tenant.erasure_confirmed`. Platform administrators and operators only (IA403 otherwise)."""
    return await tx.fetchrow("SELECT * FROM platform.confirm_erasure_request(%s, %s)", (tenant_id, user_id))


async def confirmed_request(tx: Transaction, tenant_id: UUID) -> dict[str, Any] | None:
    """The tenant's confirmed request, if any (for `tenants erase --confirmed-request`)."""
    return await tx.fetchrow(
        f"SELECT {REQUEST_COLUMNS} FROM erasure_requests WHERE tenant_id = %s AND status = 'confirmed'",
        (tenant_id,),
    )
