"""The SQL of every resource. Each statement names the tenant explicitly (`tenant_id = %s`) even
though RLS already restricts it: RLS is the guarantee, the explicit filter lets the planner (and a
distributed router such as Citus) go straight to one tenant's rows."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
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


# The SQL of a resource is built once per shape and kept as plain text: composing it on every
# request cost more than running it.
@lru_cache(maxsize=1024)
def _insert_sql(spec: Resource, columns: tuple[str, ...]) -> str:
    return (
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}")
        .format(
            sql.Identifier(spec.table),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            _select_list(spec),
        )
        .as_string(None)
    )


@lru_cache(maxsize=256)
def _get_sql(spec: Resource) -> str:
    return (
        sql.SQL("SELECT {} FROM {} WHERE tenant_id = %s AND id = %s")
        .format(_select_list(spec), sql.Identifier(spec.table))
        .as_string(None)
    )


@lru_cache(maxsize=512)
def _page_sql(spec: Resource, keyset: bool) -> str:
    return (
        sql.SQL("SELECT {} FROM {} WHERE tenant_id = %s {} ORDER BY created_at DESC, id DESC LIMIT %s")
        .format(
            _select_list(spec),
            sql.Identifier(spec.table),
            sql.SQL("AND (created_at, id) < (%s, %s)") if keyset else sql.SQL(""),
        )
        .as_string(None)
    )


@lru_cache(maxsize=1024)
def _update_sql(spec: Resource, columns: tuple[str, ...]) -> str:
    return (
        sql.SQL("UPDATE {} SET {} WHERE tenant_id = %s AND id = %s RETURNING {}")
        .format(
            sql.Identifier(spec.table),
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in columns),
            _select_list(spec),
        )
        .as_string(None)
    )


@lru_cache(maxsize=256)
def _delete_sql(spec: Resource) -> str:
    return sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND id = %s").format(sql.Identifier(spec.table)).as_string(None)


async def insert(
    tx: Transaction, spec: Resource, tenant_id: UUID, data: dict[str, Any], *, last: bool = False
) -> dict[str, Any]:
    values = {"tenant_id": tenant_id, **_values(spec, data)}
    row = await tx.fetchrow(_insert_sql(spec, tuple(values)), list(values.values()), last=last)
    assert row is not None
    return row


async def get(tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any) -> dict[str, Any] | None:
    return await tx.fetchrow(_get_sql(spec), (tenant_id, ident))


async def page(
    tx: Transaction, spec: Resource, tenant_id: UUID, limit: int, after: tuple[datetime, Any] | None
) -> list[dict[str, Any]]:
    """Newest first; `limit + 1` rows so the caller can tell whether a next page exists."""
    params: list[Any] = [tenant_id, *(after or ()), limit + 1]
    return await tx.fetch(_page_sql(spec, after is not None), params)


async def update(
    tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any, data: dict[str, Any], *, last: bool = False
) -> dict[str, Any] | None:
    if not data:
        return await get(tx, spec, tenant_id, ident)
    values = _values(spec, data)
    return await tx.fetchrow(_update_sql(spec, tuple(values)), [*values.values(), tenant_id, ident], last=last)


async def delete(tx: Transaction, spec: Resource, tenant_id: UUID, ident: Any, *, last: bool = False) -> bool:
    return await tx.execute(_delete_sql(spec), (tenant_id, ident), last=last) > 0
