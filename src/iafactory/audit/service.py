"""Reading the audit log, and recording the events only the application sees (sign-in, tenant
selection, exports). Changes to members, keys, the tenant and credits are recorded by triggers."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from iafactory.db.scope import Transaction

COLUMNS = (
    "id, action, actor_user_id, actor_api_key, actor, target_type, target_id, details, host(ip) AS ip, "
    "request_id, created_at"
)


async def record(
    tx: Transaction,
    tenant_id: UUID,
    action: str,
    *,
    user_id: int | None,
    details: dict[str, Any],
    ip: str | None,
    request_id: str | None,
) -> None:
    await tx.execute(
        "SELECT app.record_event(%s, %s, %s, %s, %s, %s)", (tenant_id, action, user_id, Jsonb(details), ip, request_id)
    )


async def page(
    tx: Transaction,
    tenant_id: UUID,
    *,
    limit: int,
    after: tuple[datetime, Any] | None,
    action: str | None,
    actor_user_id: int | None,
    since: datetime | None,
    until: datetime | None,
) -> list[dict[str, Any]]:
    clauses = ["tenant_id = %s"]
    params: list[Any] = [tenant_id]
    for clause, value in (
        ("action = %s", action),
        ("actor_user_id = %s", actor_user_id),
        ("created_at >= %s", since),
        ("created_at < %s", until),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    if after is not None:
        clauses.append("(created_at, id) < (%s, %s)")
        params.extend(after)
    params.append(limit + 1)
    return await tx.fetch(
        f"SELECT {COLUMNS} FROM audit_events WHERE {' AND '.join(clauses)} ORDER BY created_at DESC, id DESC LIMIT %s",
        params,
    )
