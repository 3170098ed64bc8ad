"""Overview: the tenant's plan, status, trial end, region and cell, credits, and this month's
usage against the plan's limits (bars) and by day (a small SVG chart)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Response

from iafactory.billing import service as billing
from iafactory.console.web import Ctx, page
from iafactory.tenancy import endpoints as tenancy_endpoints

LIMITS = ("max_members", "max_api_keys", "max_kb_bytes", "max_file_bytes", "monthly_credits")
BYTE_LIMITS = frozenset({"max_kb_bytes", "max_file_bytes"})


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following


def bars(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in LIMITS:
        limit = plan["limits"].get(name)
        used = plan["used"][name]
        share = min(1.0, used / limit) if limit else (1.0 if used else 0.0)
        out.append(
            {
                "name": name,
                "used": used,
                "limit": limit,
                "share": share,
                "percent": round(share * 100),
                "bytes": name in BYTE_LIMITS,
            }
        )
    return out


def day_chart(rows: list[dict[str, Any]], start: datetime, end: datetime) -> dict[str, Any]:
    """One bar per day of the month (events recorded that day), as SVG coordinates."""
    by_day = {row["key"]: int(row["events"]) for row in rows}
    days = (end - start).days
    peak = max(by_day.values(), default=0) or 1
    width, height, gap = 8, 60, 2
    columns = []
    for i in range(days):
        day = (start + timedelta(days=i)).date()
        count = by_day.get(day.isoformat(), 0)
        h = round(height * count / peak)
        columns.append({"x": i * (width + gap), "y": height - h, "h": h, "w": width, "day": day, "count": count})
    return {"columns": columns, "width": days * (width + gap), "height": height, "total": sum(by_day.values())}


@page("GET", "/overview", role="viewer", api="GET /api/v1/tenant")
async def overview(c: Ctx) -> Response:
    start, end = month_bounds(datetime.now(UTC))
    async with c.tenant() as s:
        tenant = await tenancy_endpoints.get_tenant(s)
        balance = await billing.balance(s.tx, s.ctx.tenant_id)
        plan = await billing.plan_usage(s.tx, s.ctx.tenant_id, start)
        daily = await billing.usage_summary(s.tx, s.ctx.tenant_id, start, end, "day")
        cell = s.cell or c.request.app.state.cells.home
    return c.render(
        "overview.html",
        title=c.t("overview.title"),
        tenant=tenant,
        balance=balance,
        bars=bars(plan),
        chart=day_chart(daily, start, end),
        month=start,
        cell=cell,
        done=c.request.query_params.get("done") if c.request.query_params.get("done") in ("joined",) else None,
    )
