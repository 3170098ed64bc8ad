"""The SQL of every resource. Each statement names the tenant explicitly (`tenant_id = %s`) even
though RLS already restricts it: RLS is the guarantee, the explicit filter lets the planner (and a
distributed router such as Citus) go straight to one tenant's rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.types.json import Jsonb

from iafactory.db.scope import Transaction
from iafactory.resources.spec import Resource


def _values(spec: Resource, data: dict[str, Any]) -> dict[str, Any]:
    return {k: Jsonb(v) if k in spec.json_columns and v is not None else v for k, v in data.items()}


def _select_list(spec: Resource) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, spec.columns))


async def insert(tx: Transaction, spec: Resource, tenant_id: UUID, data: dict[str, Any]) -> dict[str, Any]:
    values = {"tenant_id": tenant_id, **_values(spec, data)}
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
        sql.Identifier(spec.table),
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
        _select_list(spec),
    )
    row = await tx.fetchrow(query, list(values.values()))
    assert row is not None
    return row


async def get(tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any) -> dict[str, Any] | None:
    query = sql.SQL("SELECT {} FROM {} WHERE tenant_id = %s AND id = %s").format(
        _select_list(spec), sql.Identifier(spec.table))
    return await tx.fetchrow(query, (tenant_id, ident))


async def page(tx: Transaction, spec: Resource, tenant_id: UUID, limit: int,
               after: tuple[datetime, Any] | None) -> list[dict[str, Any]]:
    """Newest first; `limit + 1` rows so the caller can tell whether a next page exists."""
    keyset = sql.SQL("AND (created_at, id) < (%s, %s)") if after else sql.SQL("")
    query = sql.SQL(
        "SELECT {} FROM {} WHERE tenant_id = %s {} ORDER BY created_at DESC, id DESC LIMIT %s"
    ).format(_select_list(spec), sql.Identifier(spec.table), keyset)
    params: list[Any] = [tenant_id, *(after or ()), limit + 1]
    return await tx.fetch(query, params)


async def update(tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any,
                 data: dict[str, Any]) -> dict[str, Any] | None:
    if not data:
        return await get(tx, spec, tenant_id, ident)
    values = _values(spec, data)
    query = sql.SQL("UPDATE {} SET {} WHERE tenant_id = %s AND id = %s RETURNING {}").format(
        sql.Identifier(spec.table),
        sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in values),
        _select_list(spec),
    )
    return await tx.fetchrow(query, [*values.values(), tenant_id, ident])


async def delete(tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any) -> bool:
    query = sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND id = %s").format(sql.Identifier(spec.table))
    return await tx.execute(query, (tenant_id, ident)) > 0
