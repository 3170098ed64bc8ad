"""Credits: the balance and the ledger (grants, debits, refunds, adjustments), newest first, paged
by the API's cursor (GET /api/v1/credits and /api/v1/credits/balance: viewers)."""

from __future__ import annotations

from uuid import UUID

from fastapi import Response

from iafactory.billing import service as billing
from iafactory.console.web import Ctx, page
from iafactory.http.problems import Problem
from iafactory.resources import pagination

PAGE_SIZE = 25


@page("GET", "/credits", role="viewer", api="GET /api/v1/credits")
async def credits_page(c: Ctx) -> Response:
    cursor = c.request.query_params.get("cursor") or None
    try:
        after = pagination.decode(cursor, UUID) if cursor else None
    except Problem:
        after, cursor = None, None
    async with c.tenant() as s:
        balance = await billing.balance(s.tx, s.ctx.tenant_id)
        rows = await billing.credit_page(s.tx, s.ctx.tenant_id, PAGE_SIZE, after)
    entries, next_cursor = pagination.page_of(rows, PAGE_SIZE)
    return c.render(
        "credits.html",
        title=c.t("credits.title"),
        balance=balance,
        entries=entries,
        next_cursor=next_cursor,
        first_page=cursor is None,
    )
