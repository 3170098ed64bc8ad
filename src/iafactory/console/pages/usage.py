"""Usage: a month's metered events by type (bars) and by day (a small SVG chart, with the same
figures in a table for screen readers and text browsers); a month picker. The API's summary
(GET /api/v1/usage/summary) over [first day of the month, first day of the next)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import Response

from iafactory.billing import service as billing
from iafactory.console.pages.overview import day_chart, month_bounds
from iafactory.console.web import Ctx, page

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def chosen_month(value: str | None, now: datetime) -> datetime:
    """The first instant (UTC) of ?month=YYYY-MM, or of the current month."""
    match = _MONTH.match(value or "")
    if match and 2000 <= int(match.group(1)) <= 2100:
        return datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=UTC)
    return month_bounds(now)[0]


def type_bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One bar per event type, its length the share of the biggest quantity (5% steps: CSS classes)."""
    peak = max((float(r["quantity"]) for r in rows), default=0.0) or 1.0
    out = []
    for r in rows:
        share = float(r["quantity"]) / peak
        out.append({**r, "share": share, "step": round(share * 20) * 5})
    return out


@page("GET", "/usage", role="viewer", api="GET /api/v1/usage/summary")
async def usage_page(c: Ctx) -> Response:
    now = datetime.now(UTC)
    start = chosen_month(c.request.query_params.get("month"), now)
    start, end = month_bounds(start)
    previous = month_bounds(start - timedelta(days=1))[0]
    async with c.tenant() as s:
        by_type = await billing.usage_summary(s.tx, s.ctx.tenant_id, start, end, "type")
        by_day = await billing.usage_summary(s.tx, s.ctx.tenant_id, start, end, "day")
    return c.render(
        "usage.html",
        title=c.t("usage.title"),
        month=start,
        month_value=f"{start:%Y-%m}",
        previous=f"{previous:%Y-%m}",
        following=f"{end:%Y-%m}" if end <= now else None,
        this_month=f"{now:%Y-%m}",
        by_type=type_bars(by_type),
        by_day=[{**r, "day": date.fromisoformat(r["key"])} for r in by_day],
        chart=day_chart(by_day, start, end),
    )
