"""Audit log (admins, as GET /api/v1/audit-events): filters (action, actor, date range), pages
by the API's cursor, and the same selection as a CSV download. Cells are safe to open in a
spreadsheet: one that starts with = + - @ (or a tab / carriage return) is prefixed with a quote,
so it is read as text, never as a formula (CSV injection)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import Response

from iafactory.audit import service as audit
from iafactory.console.web import Ctx, page
from iafactory.http.problems import Problem
from iafactory.resources import pagination
from iafactory.tenancy import endpoints as tenancy_endpoints

PAGE_SIZE = 50
CSV_CHUNK = 1000
CSV_MAX_ROWS = 100_000  # one download; narrow the dates for more
CSV_COLUMNS = (
    "created_at",
    "action",
    "actor",
    "actor_user_id",
    "actor_api_key",
    "target_type",
    "target_id",
    "ip",
    "request_id",
    "details",
)
# The actions the triggers and the application record (a hint list; any text is accepted).
KNOWN_ACTIONS = (
    "member.added",
    "member.removed",
    "member.role_changed",
    "api_key.created",
    "api_key.revoked",
    "tenant.created",
    "tenant.plan_changed",
    "tenant.status_changed",
    "tenant.settings_changed",
    "tenant.exported",
    "tenant.erasure_requested",
    "tenant.erasure_cancelled",
    "tenant.erasure_confirmed",
    "credits.grant",
    "credits.debit",
    "auth.login",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: formulas are neutralised with a leading quote."""
    text = "" if value is None else value if isinstance(value, str) else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _day(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def filters_of(c: Ctx) -> dict[str, Any]:
    """The filters of the query string, as typed (for the form and links) and as the service's
    arguments. Dates are whole UTC days; `to` is inclusive."""
    q = c.request.query_params
    action = (q.get("action") or "").strip()[:100]
    actor = q.get("actor") or ""
    since, until = _day(q.get("from")), _day(q.get("to"))
    return {
        "form": {
            "action": action,
            "actor": actor,
            "from": since.isoformat() if since else "",
            "to": until.isoformat() if until else "",
        },
        "action": action or None,
        "actor_user_id": int(actor) if actor.isdigit() and 0 < int(actor) < 2**31 else None,
        "since": datetime.combine(since, time(), UTC) if since else None,
        "until": datetime.combine(until + timedelta(days=1), time(), UTC) if until else None,
    }


def _query(form: dict[str, str], **extra: str) -> str:
    return urlencode({**{k: v for k, v in form.items() if v}, **extra})


@page("GET", "/audit", role="admin", api="GET /api/v1/audit-events")
async def audit_page(c: Ctx) -> Response:
    f = filters_of(c)
    cursor = c.request.query_params.get("cursor") or None
    try:
        after = pagination.decode(cursor, UUID) if cursor else None
    except Problem:
        after, cursor = None, None
    async with c.tenant() as s:
        rows = await audit.page(
            s.tx,
            s.ctx.tenant_id,
            limit=PAGE_SIZE,
            after=after,
            action=f["action"],
            actor_user_id=f["actor_user_id"],
            since=f["since"],
            until=f["until"],
        )
        members = await tenancy_endpoints.list_members(s)
    events, next_cursor = pagination.page_of(rows, PAGE_SIZE)
    return c.render(
        "audit.html",
        title=c.t("audit.title"),
        events=[{**e, "details_text": json.dumps(e["details"], ensure_ascii=False)} for e in events],
        members=members,
        people={m["user_id"]: m["name"] or m["email"] for m in members},
        form=f["form"],
        actions=KNOWN_ACTIONS,
        first_link=_query(f["form"]) if cursor else None,
        next_link=_query(f["form"], cursor=next_cursor) if next_cursor else None,
        csv_link=_query(f["form"]),
    )


@page("GET", "/audit.csv", role="admin", api="GET /api/v1/audit-events")
async def audit_csv(c: Ctx) -> Response:
    """Every event the filters select (newest first, up to CSV_MAX_ROWS), read page by page in one
    transaction through the API's service."""
    f = filters_of(c)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    written, after = 0, None
    async with c.tenant() as s:
        while written < CSV_MAX_ROWS:
            rows = await audit.page(
                s.tx,
                s.ctx.tenant_id,
                limit=CSV_CHUNK,
                after=after,
                action=f["action"],
                actor_user_id=f["actor_user_id"],
                since=f["since"],
                until=f["until"],
            )
            for e in rows[:CSV_CHUNK]:
                cells = {
                    **e,
                    "created_at": e["created_at"].astimezone(UTC).isoformat(),
                    "details": json.dumps(e["details"], ensure_ascii=False, sort_keys=True),
                }
                writer.writerow([safe_cell(cells[k]) for k in CSV_COLUMNS])
                written += 1
            if len(rows) <= CSV_CHUNK:
                break
            last = rows[CSV_CHUNK - 1]
            after = (last["created_at"], last["id"])
    tenant = (c.layout or {}).get("tenant")
    name = tenant.slug if tenant is not None else "tenant"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    response = Response(
        # A byte-order mark: spreadsheets then read the file as UTF-8 (names in Arabic, accents).
        content="\ufeff" + out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="audit-{name}-{stamp}.csv"',
            "X-Content-Type-Options": "nosniff",
        },
    )
    return c.finish(response)
