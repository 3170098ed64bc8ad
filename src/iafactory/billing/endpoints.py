"""/api/v1/billing-account, /api/v1/credits and /api/v1/usage-events.

Reading is open to every member of the tenant (viewer); recording usage needs a member (or a write
API key); the billing contact is the admins'. The SQL is in billing/service.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Query

from iafactory.auth.dependencies import Admin, Member, Viewer
from iafactory.billing import service
from iafactory.billing.schemas import (
    BillingAccount,
    BillingAccountUpdate,
    CreditBalance,
    CreditTransaction,
    UsageBatch,
    UsageBatchResult,
    UsageEvent,
    UsageSummary,
)
from iafactory.http.idempotency import Idempotent
from iafactory.http.problems import invalid
from iafactory.http.rendering import api_router
from iafactory.resources.pagination import DEFAULT_LIMIT, MAX_LIMIT, Cursor, Page, decode, page_of
from iafactory.resources.types import Timestamp

router = api_router()

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")]


@router.get(
    "/billing-account",
    response_model=BillingAccount,
    tags=["billing"],
    operation_id="get_billing_account",
    summary="The tenant's billing account (defaults until first saved)",
)
async def get_billing_account(s: Viewer) -> Any:
    return await service.get_account(s.tx, s.ctx.tenant_id)


@router.patch(
    "/billing-account",
    response_model=BillingAccount,
    tags=["billing"],
    operation_id="update_billing_account",
    summary="Edit the billing contact (admin)",
)
async def update_billing_account(body: BillingAccountUpdate, s: Admin) -> Any:
    return await service.update_account(s.tx, s.ctx.tenant_id, body.model_dump(exclude_unset=True))


@router.get(
    "/credits",
    response_model=Page[CreditTransaction],
    tags=["billing"],
    operation_id="list_credits",
    summary="The credit ledger, newest first",
)
async def list_credits(s: Viewer, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> Any:
    after = decode(cursor, UUID) if cursor else None
    rows = await service.credit_page(s.tx, s.ctx.tenant_id, limit, after)
    items, next_cursor = page_of(rows, limit)
    return {"items": items, "next_cursor": next_cursor}


@router.get(
    "/credits/balance",
    response_model=CreditBalance,
    tags=["billing"],
    operation_id="get_credit_balance",
    summary="The tenant's credit balance",
)
async def get_credit_balance(s: Viewer) -> Any:
    return await service.balance(s.tx, s.ctx.tenant_id)


@router.post(
    "/usage-events",
    status_code=200,
    response_model=UsageBatchResult,
    tags=["billing"],
    operation_id="record_usage_events",
    summary="Record a batch of usage events (idempotent per idempotency_key)",
    description="Events whose idempotency_key is already stored for the tenant are not stored again: "
    "they are listed under `duplicates`. A key repeated within one batch counts once.",
)
async def record_usage_events(body: UsageBatch, s: Member, idempotency: Idempotent) -> Any:
    async def record(last: bool) -> dict[str, Any]:
        accepted, duplicates = await service.record_usage(
            s.tx, s.ctx.tenant_id, body.events, user_id=s.ctx.user_id, api_key_id=s.ctx.api_key_id
        )
        return {"accepted": accepted, "duplicates": duplicates}

    return await idempotency.create(s, record)


@router.get(
    "/usage-events",
    response_model=Page[UsageEvent],
    tags=["billing"],
    operation_id="list_usage_events",
    summary="Usage events, newest first",
)
async def list_usage_events(
    s: Viewer,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    event_type: Annotated[str | None, Query(min_length=1, max_length=100, description="Only this event type")] = None,
) -> Any:
    after = decode(cursor, UUID) if cursor else None
    rows = await service.usage_page(s.tx, s.ctx.tenant_id, limit, after, event_type)
    items, next_cursor = page_of(rows, limit)
    return {"items": items, "next_cursor": next_cursor}


@router.get(
    "/usage/summary",
    response_model=UsageSummary,
    tags=["billing"],
    operation_id="get_usage_summary",
    responses={
        422: {"description": "`from` is not before `to`, or a bound lacks its time zone (application/problem+json)"}
    },
    summary="Usage totals over a period, by event type or by day",
)
async def usage_summary(
    s: Viewer,
    # Timestamp: a date-time without a zone is refused by validation, naming the field, like every
    # other 422.
    since: Annotated[
        Timestamp,
        Query(alias="from", description="Start (inclusive), with a time zone, e.g. 2026-11-01T00:00:00Z; before `to`"),
    ],
    until: Annotated[
        Timestamp, Query(alias="to", description="End (exclusive), with a time zone, e.g. 2026-12-01T00:00:00Z")
    ],
    group_by: Annotated[Literal["type", "day"], Query()] = "type",
) -> Any:
    if since >= until:
        raise invalid("query.from", "must be before query.to")
    rows = await service.usage_summary(s.tx, s.ctx.tenant_id, since, until, group_by)
    return {"since": since, "until": until, "group_by": group_by, "rows": rows}
