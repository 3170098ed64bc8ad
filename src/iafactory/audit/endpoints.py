"""GET /api/v1/audit-events (admins)."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import Query

from iafactory.audit import service
from iafactory.audit.schemas import AuditEventOut
from iafactory.auth.dependencies import Admin
from iafactory.http.rendering import api_router
from iafactory.resources.pagination import DEFAULT_LIMIT, MAX_LIMIT, Cursor, Page, decode, page_of
from iafactory.resources.types import Timestamp

router = api_router(tags=["audit"])


@router.get(
    "/audit-events",
    response_model=Page[AuditEventOut],
    operation_id="list_audit_events",
    summary="The tenant's audit log (admin)",
)
async def list_audit_events(
    s: Admin,
    action: Annotated[str | None, Query(max_length=100, description="e.g. member.added")] = None,
    actor_user_id: Annotated[int | None, Query(ge=1)] = None,
    since: Annotated[Timestamp | None, Query(description="From this time (inclusive)")] = None,
    until: Annotated[Timestamp | None, Query(description="Before this time")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Any:
    after = decode(cursor, UUID) if cursor else None
    rows = await service.page(
        s.tx,
        s.ctx.tenant_id,
        limit=limit,
        after=after,
        action=action,
        actor_user_id=actor_user_id,
        since=since,
        until=until,
    )
    items, next_cursor = page_of(rows, limit)
    return {"items": items, "next_cursor": next_cursor}
