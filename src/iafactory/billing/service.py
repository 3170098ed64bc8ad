"""The SQL of billing: the billing account, the credit ledger and usage events.

Every statement names the tenant explicitly (`tenant_id = %s`) even though RLS already restricts
it, as in iafactory.resources.repository. The caller owns the transaction; nothing here commits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any
from uuid import UUID

from psycopg import sql

from iafactory.billing.schemas import UsageEventIn
from iafactory.db.scope import Transaction

ACCOUNT_COLUMNS = (
    "billing_name",
    "billing_email",
    "address",
    "vat_number",
    "currency",
    "credit_balance",
    "created_at",
    "updated_at",
)
# What GET answers before the account has ever been saved: the column defaults of billing_accounts (007),
# and the currency of the tenant's region (012), which the account will take when it is created.
DEFAULT_ACCOUNT: dict[str, Any] = {
    "billing_name": "",
    "billing_email": None,
    "address": "",
    "vat_number": None,
    "credit_balance": 0,
    "created_at": None,
    "updated_at": None,
}
# The contact fields; credit_balance is deliberately not among them (nor granted to the application, 010).
EDITABLE_ACCOUNT_COLUMNS = frozenset({"billing_name", "billing_email", "address", "vat_number", "currency"})

CREDIT_COLUMNS = ("id", "kind", "amount", "reason", "idempotency_key", "balance_after", "created_by", "created_at")
USAGE_COLUMNS = (
    "id",
    "event_type",
    "quantity",
    "occurred_at",
    "idempotency_key",
    "properties",
    "user_id",
    "api_key_id",
    "created_at",
)


def _columns(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


# --- Billing account -----------------------------------------------------------------------------


async def get_account(tx: Transaction, tenant_id: UUID) -> dict[str, Any]:
    """The tenant's account, or the defaults when none has been saved yet (nothing is written)."""
    query = sql.SQL("SELECT {} FROM billing_accounts WHERE tenant_id = %s").format(_columns(ACCOUNT_COLUMNS))
    row = await tx.fetchrow(query, (tenant_id,))
    return row if row is not None else {**DEFAULT_ACCOUNT, "currency": await _region_currency(tx, tenant_id)}


async def _region_currency(tx: Transaction, tenant_id: UUID) -> str:
    return await tx.fetchval("SELECT app.region_currency(region) FROM tenants WHERE id = %s", (tenant_id,))


async def update_account(tx: Transaction, tenant_id: UUID, changes: dict[str, Any]) -> dict[str, Any]:
    """Creates the account with `changes` (other columns take their defaults) or changes only those
    columns of the existing one. One statement, so two first saves at once cannot collide."""
    unknown = set(changes) - EDITABLE_ACCOUNT_COLUMNS
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    if not changes:
        return await get_account(tx, tenant_id)
    names = list(changes)
    query = sql.SQL(
        "INSERT INTO billing_accounts (tenant_id, {}) VALUES (%s, {}) "
        "ON CONFLICT (tenant_id) DO UPDATE SET {} WHERE billing_accounts.tenant_id = %s RETURNING {}"
    ).format(
        _columns(names),
        sql.SQL(", ").join(sql.Placeholder() * len(names)),
        sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names),
        _columns(ACCOUNT_COLUMNS),
    )
    row = await tx.fetchrow(query, [tenant_id, *changes.values(), tenant_id])
    assert row is not None
    return row


async def balance(tx: Transaction, tenant_id: UUID) -> dict[str, Any]:
    row = await tx.fetchrow(
        "SELECT credit_balance AS balance, currency FROM billing_accounts WHERE tenant_id = %s", (tenant_id,)
    )
    if row is None:
        return {"balance": DEFAULT_ACCOUNT["credit_balance"], "currency": await _region_currency(tx, tenant_id)}
    return row


# --- Credit ledger -------------------------------------------------------------------------------
# Read-only here: only the definer functions of 010 (grants, debits of billable actions) write it.


async def credit_page(
    tx: Transaction, tenant_id: UUID, limit: int, after: tuple[datetime, Any] | None
) -> list[dict[str, Any]]:
    """Newest first; `limit + 1` rows so the caller can tell whether a next page exists."""
    keyset = sql.SQL("AND (created_at, id) < (%s, %s)") if after else sql.SQL("")
    query = sql.SQL(
        "SELECT {} FROM credit_transactions WHERE tenant_id = %s {} ORDER BY created_at DESC, id DESC LIMIT %s"
    ).format(_columns(CREDIT_COLUMNS), keyset)
    return await tx.fetch(query, [tenant_id, *(after or ()), limit + 1])


# --- Usage events --------------------------------------------------------------------------------

# One statement for the whole batch: a multi-row VALUES list (an INSERT ... SELECT into a table with
# row security is what a distributed PostgreSQL refuses). A key already stored for the tenant is
# skipped by ON CONFLICT; RETURNING tells which keys this statement stored. The text depends only
# on the batch size, so it is built once per size.
_USAGE_COLUMNS = (
    "tenant_id",
    "event_type",
    "quantity",
    "occurred_at",
    "idempotency_key",
    "properties",
    "user_id",
    "api_key_id",
)
_USAGE_ROW = "(%s::uuid, %s, %s::numeric, coalesce(%s::timestamptz, now()), %s, %s::jsonb, %s::integer, %s::uuid)"


@lru_cache(maxsize=64)
def _insert_usage_sql(rows: int) -> str:
    return (
        f"INSERT INTO usage_events ({', '.join(_USAGE_COLUMNS)}) VALUES "
        + ", ".join([_USAGE_ROW] * rows)
        + " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING idempotency_key"
    )


async def record_usage(
    tx: Transaction, tenant_id: UUID, events: Sequence[UsageEventIn], *, user_id: int | None, api_key_id: UUID | None
) -> tuple[list[str], list[str]]:
    """Stores the events whose key is new for the tenant. Returns (accepted, duplicates), each in
    batch order; a key repeated inside the batch counts once (its first occurrence is stored)."""
    unique: dict[str, UsageEventIn] = {}
    for event in events:
        unique.setdefault(event.idempotency_key, event)
    batch = list(unique.values())
    params: list[Any] = []
    for e in batch:
        params += [
            tenant_id,
            e.event_type,
            e.quantity,
            e.occurred_at,
            e.idempotency_key,
            json.dumps(e.properties, ensure_ascii=False),
            user_id,
            api_key_id,
        ]
    rows = await tx.fetch(_insert_usage_sql(len(batch)), params)
    stored = {r["idempotency_key"] for r in rows}
    return [k for k in unique if k in stored], [k for k in unique if k not in stored]


async def usage_page(
    tx: Transaction, tenant_id: UUID, limit: int, after: tuple[datetime, Any] | None, event_type: str | None = None
) -> list[dict[str, Any]]:
    """Newest first (by the time the event was received), optionally one event type."""
    conditions = [sql.SQL("tenant_id = %s")]
    params: list[Any] = [tenant_id]
    if event_type is not None:
        conditions.append(sql.SQL("event_type = %s"))
        params.append(event_type)
    if after is not None:
        conditions.append(sql.SQL("(created_at, id) < (%s, %s)"))
        params.extend(after)
    query = sql.SQL("SELECT {} FROM usage_events WHERE {} ORDER BY created_at DESC, id DESC LIMIT %s").format(
        _columns(USAGE_COLUMNS), sql.SQL(" AND ").join(conditions)
    )
    return await tx.fetch(query, [*params, limit + 1])


async def usage_summary(
    tx: Transaction, tenant_id: UUID, since: datetime, until: datetime, group_by: str
) -> list[dict[str, Any]]:
    """Totals aggregated by the database, by event type or by UTC day, over [since, until)."""
    key = "event_type" if group_by == "type" else "date_trunc('day', occurred_at AT TIME ZONE 'UTC')::date::text"
    return await tx.fetch(
        f"""SELECT {key} AS key, count(*) AS events, sum(quantity) AS quantity
            FROM usage_events
            WHERE tenant_id = %s AND occurred_at >= %s AND occurred_at < %s
            GROUP BY 1 ORDER BY 1""",
        (tenant_id, since, until),
    )


# --- Usage against the plan's limits ----------------------------------------------------------------


async def plan_usage(tx: Transaction, tenant_id: UUID, month_start: datetime) -> dict[str, Any]:
    """The limits in force (the plan's, with the tenant's overrides: app.tenant_limits) and what is
    used of each: members, live API keys and knowledge-base bytes as the plan-limit trigger counts
    them (010), credits spent since `month_start` against the monthly grant, and against the
    largest file a tenant may upload (max_file_bytes) the largest file it keeps."""
    limits = await tx.fetchrow("SELECT * FROM app.tenant_limits(%s)", (tenant_id,))
    members = await tx.fetchval("SELECT count(*) FROM tenant_users WHERE tenant_id = %s", (tenant_id,))
    keys = await tx.fetchval("SELECT count(*) FROM api_keys WHERE tenant_id = %s AND revoked_at IS NULL", (tenant_id,))
    # Documents' text and uploaded files together, as the plan-limit trigger counts them (030).
    storage = await tx.fetchrow(
        """SELECT (SELECT coalesce(sum(octet_length(content)), 0) FROM knowledge_base WHERE tenant_id = %s)
                  + coalesce(sum(f.size_bytes), 0) AS kb_bytes,
                  coalesce(max(f.size_bytes), 0) AS largest_file
           FROM knowledge_files f WHERE f.tenant_id = %s""",
        (tenant_id, tenant_id),
    )
    assert storage is not None  # an aggregate always returns its row
    kb_bytes, largest_file = storage["kb_bytes"], storage["largest_file"]
    spent = await tx.fetchval(
        "SELECT coalesce(-sum(amount), 0) FROM credit_transactions "
        "WHERE tenant_id = %s AND kind = 'debit' AND created_at >= %s",
        (tenant_id, month_start),
    )
    return {
        "limits": limits or {},
        "used": {
            "max_members": int(members or 0),
            "max_api_keys": int(keys or 0),
            "max_kb_bytes": int(kb_bytes or 0),
            "monthly_credits": int(spent or 0),
            "max_file_bytes": int(largest_file or 0),
        },
    }
