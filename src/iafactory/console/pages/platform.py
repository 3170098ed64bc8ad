"""Platform pages (platform administrators only): every tenant by region, plan and status, with a
search and pages, and the cell holding each; a new tenant (its owner invited by email); one
tenant's plan, status, limits and credits.

Each page calls the API's own handler (tenancy/endpoints.py, /api/v1/admin/tenants...): the same
platform check in the database (app.assert_platform_operator), the same path through the cells
with IAFACTORY_CELLS (the directory gives the page and each cell fills in its own tenants; a new
tenant is written to the directory first, then to the cell serving its region, with its owner's
invitation in the same transaction), the same audit. `@page(platform=True)` refuses anyone else
before the handler runs.

The search (name, identifier or admin email, any case) is not an API parameter: it filters the
API's own pages, read one after the other (MAX_LIMIT at a time) until a page of matches is full.
The directory holds no names, so with cells there is no index to ask; this reads every tenant of
the filters once per page of matches, fine for thousands of tenants, not for millions.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any, get_args
from urllib.parse import urlencode
from uuid import UUID

from fastapi import Response
from pydantic import ValidationError

from iafactory.auth.dependencies import user_transaction
from iafactory.console.web import Ctx, page
from iafactory.http.problems import Problem
from iafactory.resources.pagination import CURSOR_PATTERNS, MAX_LIMIT, encode
from iafactory.tenancy import data_endpoints, data_rights
from iafactory.tenancy import endpoints as tenancy_endpoints
from iafactory.tenancy.schemas import AdminTenantUpdate, CreditGrant, Plan, Region, Status, TenantCreate

PAGE_SIZE = 25
REGIONS: tuple[str, ...] = get_args(Region)
PLANS: tuple[str, ...] = get_args(Plan)
STATUSES: tuple[str, ...] = get_args(Status)
LIMITS = (
    "requests_per_minute",
    "key_requests_per_minute",
    "max_members",
    "max_api_keys",
    "max_kb_bytes",
    "max_file_bytes",
    "monthly_credits",
)
DONE = frozenset({"platform_created", "platform_updated", "platform_limits", "erasure_confirmed"})
RECENT_DECIDED = 25  # confirmed or cancelled requests shown below the pending ones


def _choice(value: str | None, allowed: tuple[str, ...]) -> str | None:
    return value if value in allowed else None


def _messages(err: ValidationError) -> str:
    """Pydantic's errors, each naming its field (as the API's 422 problem does)."""
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"])
        parts.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _number(value: str) -> int | str:
    """A form's digits as an integer; anything else as typed, for the schema to refuse by name."""
    return int(value) if re.fullmatch(r"-?[0-9]{1,18}", value) else value


def _matches(tenant: dict[str, Any], q: str) -> bool:
    needle = q.casefold()
    return any(needle in (tenant.get(k) or "").casefold() for k in ("name", "slug", "admin_email"))


async def find_tenants(
    c: Ctx, filters: dict[str, str | None], q: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of tenants as GET /api/v1/admin/tenants answers it; with a search, the API's pages
    read in turn until `limit` tenants match (the next cursor: after the last match shown)."""
    assert c.who is not None
    region, plan, status = filters["region"], filters["plan"], filters["status"]
    if not q:
        got = await tenancy_endpoints.admin_list_tenants(c.request, c.who, region, plan, status, limit, cursor)  # type: ignore[arg-type]
        return got["items"], got["next_cursor"]
    found: list[dict[str, Any]] = []
    after = cursor
    while True:
        got = await tenancy_endpoints.admin_list_tenants(c.request, c.who, region, plan, status, MAX_LIMIT, after)  # type: ignore[arg-type]
        items = got["items"]
        for i, item in enumerate(items):
            if _matches(item, q):
                found.append(item)
                if len(found) == limit:
                    more = i < len(items) - 1 or got["next_cursor"] is not None
                    return found, encode(item["created_at"], item["id"]) if more else None
        if got["next_cursor"] is None:
            return found, None
        after = got["next_cursor"]


async def cell_of(c: Ctx, tenant_id: UUID) -> str | None:
    """The cell holding a tenant, as the admin routes find it (the directory; one cell: that one)."""
    found = await c.request.app.state.cells.route(tenant_id)
    return found.cell if found is not None else None


async def list_view(
    c: Ctx, *, status: int = 200, error: str | None = None, form: dict[str, str] | None = None
) -> Response:
    query = c.request.query_params
    filters = {
        "region": _choice(query.get("region"), REGIONS),
        "plan": _choice(query.get("plan"), PLANS),
        "status": _choice(query.get("status"), STATUSES),
    }
    q = query.get("q", "").strip()[:200]
    cursor = query.get("cursor") or None
    try:
        limit = min(max(int(query.get("limit", PAGE_SIZE)), 1), MAX_LIMIT)
    except ValueError:
        limit = PAGE_SIZE
    if cursor is not None and not _valid_cursor(cursor):
        raise Problem(422, "Unprocessable Content", c.t("platform.bad_cursor"))
    rows, next_cursor = await find_tenants(c, filters, q, cursor, limit)
    cells = {r["id"]: await cell_of(c, r["id"]) for r in rows}
    kept = {k: v for k, v in (*filters.items(), ("q", q or None)) if v}
    if limit != PAGE_SIZE:
        kept["limit"] = str(limit)
    done = query.get("done")
    return c.render(
        "platform_tenants.html",
        status=status,
        title=c.t("platform.title"),
        tenants=rows,
        cells=cells,
        filters=filters,
        q=q,
        next_query=_query({**kept, "cursor": next_cursor}) if next_cursor else None,
        first_query=_query(kept) if cursor else None,
        regions=REGIONS,
        plans=PLANS,
        statuses=STATUSES,
        form=form or {"name": "", "slug": "", "region": "CH", "plan": "free", "status": "trial", "admin_email": ""},
        error=error,
        done=done if done in DONE else None,
    )


def _valid_cursor(value: str) -> bool:
    return bool(re.fullmatch(CURSOR_PATTERNS[UUID], value))


def _query(values: Mapping[str, str | None]) -> str:
    return urlencode({k: v for k, v in values.items() if v})


@page("GET", "/platform/tenants", platform=True, api="GET /api/v1/admin/tenants")
async def tenants_page(c: Ctx) -> Response:
    return await list_view(c)


@page("POST", "/platform/tenants", platform=True, api="POST /api/v1/admin/tenants")
async def create_tenant(c: Ctx) -> Response:
    """As POST /api/v1/admin/tenants: in the cell serving the region (directory first with cells);
    an admin email gets an owner invitation, sent with the tenant's creation."""
    assert c.who is not None
    form = {k: c.form.get(k, "").strip() for k in ("name", "slug", "region", "plan", "status", "admin_email")}
    values: dict[str, Any] = {k: v for k, v in form.items() if v}
    try:
        body = TenantCreate.model_validate(values)
    except ValidationError as err:
        return await list_view(c, status=422, error=_messages(err), form=form)
    try:
        tenant = await tenancy_endpoints.admin_create_tenant(body, c.request, c.who)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await list_view(c, status=problem.status, error=problem.detail, form=form)
    return c.redirect(f"/platform/tenants/{tenant.id}", done="platform_created")


async def detail_view(
    c: Ctx, tenant_id: UUID, *, status: int = 200, error: str | None = None, granted: dict | None = None
) -> Response:
    assert c.who is not None
    tenant = await tenancy_endpoints.admin_get_tenant(tenant_id, c.request, c.who)
    done = c.request.query_params.get("done")
    return c.render(
        "platform_tenant.html",
        status=status,
        title=tenant.name,
        tenant=tenant,
        erasure=await open_erasure_request(c, tenant_id),
        cell=await cell_of(c, tenant_id),
        overrides=(tenant.settings or {}).get("limits") or {},
        limit_names=LIMITS,
        plans=PLANS,
        statuses=STATUSES,
        grant_key=str(uuid.uuid4()),  # the form's idempotency key: sending it twice grants once
        granted=granted,
        error=error,
        done=done if done in DONE else None,
    )


TENANT = {"tenant_id": "tenant"}


@page(
    "GET",
    "/platform/tenants/{tenant_id:uuid}",
    platform=True,
    api="GET /api/v1/admin/tenants/{tenant_id}",
    params=TENANT,
)
async def tenant_page(c: Ctx) -> Response:
    return await detail_view(c, c.request.path_params["tenant_id"])


async def _update(c: Ctx, tenant_id: UUID, values: dict[str, Any], done: str) -> Response:
    assert c.who is not None
    try:
        body = AdminTenantUpdate.model_validate(values)
    except ValidationError as err:
        return await detail_view(c, tenant_id, status=422, error=_messages(err))
    try:
        await tenancy_endpoints.admin_update_tenant(tenant_id, body, c.request, c.who)
    except Problem as problem:
        if problem.status in (401, 403, 404):
            raise
        return await detail_view(c, tenant_id, status=problem.status, error=problem.detail)
    return c.redirect(f"/platform/tenants/{tenant_id}", done=done)


@page(
    "POST",
    "/platform/tenants/{tenant_id:uuid}/plan",
    platform=True,
    api="PATCH /api/v1/admin/tenants/{tenant_id}",
    params=TENANT,
)
async def change_plan(c: Ctx) -> Response:
    """Plan and status (the directory's copy follows, as PATCH /api/v1/admin/tenants/{id} does)."""
    values = {k: c.form[k] for k in ("plan", "status") if c.form.get(k)}
    return await _update(c, c.request.path_params["tenant_id"], values, "platform_updated")


@page(
    "POST",
    "/platform/tenants/{tenant_id:uuid}/limits",
    platform=True,
    api="PATCH /api/v1/admin/tenants/{tenant_id}",
    params=TENANT,
)
async def change_limits(c: Ctx) -> Response:
    """The limit overrides, replaced as a whole (a blank field: the plan's own limit)."""
    limits = {k: _number(c.form[k].strip()) for k in LIMITS if c.form.get(k, "").strip()}
    return await _update(c, c.request.path_params["tenant_id"], {"limits": limits}, "platform_limits")


@page(
    "POST",
    "/platform/tenants/{tenant_id:uuid}/credits",
    platform=True,
    api="POST /api/v1/admin/tenants/{tenant_id}/credits",
    params=TENANT,
)
async def grant_credits(c: Ctx) -> Response:
    """As POST /api/v1/admin/tenants/{id}/credits, with the form's own idempotency key: the same
    form sent twice (a reload, a double click) grants once, and says so."""
    assert c.who is not None
    tenant_id: UUID = c.request.path_params["tenant_id"]
    values = {
        "amount": _number(c.form.get("amount", "").strip()),
        "reason": c.form.get("reason", "").strip(),
        "kind": c.form.get("kind", "grant"),
        "idempotency_key": c.form.get("idempotency_key", ""),
    }
    try:
        body = CreditGrant.model_validate(values)
    except ValidationError as err:
        return await detail_view(c, tenant_id, status=422, error=_messages(err))
    try:
        result = await tenancy_endpoints.admin_grant_credits(tenant_id, body, c.request, c.who)
    except Problem as problem:
        if problem.status in (401, 403, 404):
            raise
        return await detail_view(c, tenant_id, status=problem.status, error=problem.detail)
    return await detail_view(c, tenant_id, granted={**result, "amount": body.amount, "kind": body.kind})


# --- erasure requests ----------------------------------------------------------------------------
# The owner asks on the tenant's "Your data" page; a platform administrator confirms here; an
# operator erases (`iafactory tenants erase SLUG --confirm SLUG --confirmed-request`).


async def open_erasure_request(c: Ctx, tenant_id: UUID) -> dict[str, Any] | None:
    """The tenant's open (pending or confirmed) erasure request, read in its own cell as the
    platform administrator, with the function GET /api/v1/admin/erasure-requests uses there."""
    assert c.who is not None
    cell = await tenancy_endpoints._route(c.request, tenant_id)
    async with user_transaction(c.request, c.who, cell) as tx:
        for status in ("pending", "confirmed"):
            for row in await data_rights.pending_erasure_requests(tx, status):
                if row["tenant_id"] == tenant_id:
                    return row
    return None


async def erasure_view(c: Ctx, *, status: int = 200, error: str | None = None, failed: UUID | None = None) -> Response:
    """Pending requests (oldest first, each with its confirm form), then the most recent decided
    ones: GET /api/v1/admin/erasure-requests?status= (all), its handler, every cell."""
    assert c.who is not None
    rows = await data_endpoints.admin_list_erasure_requests(c.request, c.who, None)
    home = c.request.app.state.cells.home
    for row in rows:
        row["cell"] = row["cell"] or home
    pending = [r for r in rows if r["status"] == "pending"]
    decided = sorted(
        (r for r in rows if r["status"] != "pending"), key=lambda r: r["decided_at"] or r["created_at"], reverse=True
    )[:RECENT_DECIDED]
    # The region of each pending request's tenant (the requests hold the slug and name only).
    regions = {}
    for r in pending:
        try:
            regions[r["tenant_id"]] = (
                await tenancy_endpoints.admin_get_tenant(r["tenant_id"], c.request, c.who)
            ).region
        except Problem as problem:
            if problem.status != 404:
                raise
    done = c.request.query_params.get("done")
    return c.render(
        "platform_erasures.html",
        status=status,
        title=c.t("erasures.title"),
        pending=pending,
        decided=decided,
        regions=regions,
        error=error,
        failed=failed,
        done=done if done in DONE else None,
    )


@page("GET", "/platform/erasure-requests", platform=True, api="GET /api/v1/admin/erasure-requests")
async def erasure_requests_page(c: Ctx) -> Response:
    return await erasure_view(c)


@page(
    "POST",
    "/platform/tenants/{tenant_id:uuid}/erasure-request/confirm",
    platform=True,
    api="POST /api/v1/admin/tenants/{tenant_id}/erasure-request/confirm",
    params=TENANT,
)
async def confirm_erasure(c: Ctx) -> Response:
    """As POST /api/v1/admin/tenants/{id}/erasure-request/confirm (its handler), once the tenant's
    identifier is typed, as the owner typed it to ask. Confirming does not erase: an operator does."""
    assert c.who is not None
    tenant_id: UUID = c.request.path_params["tenant_id"]
    tenant = await tenancy_endpoints.admin_get_tenant(tenant_id, c.request, c.who)  # 404: no such tenant
    if c.form.get("confirm", "").strip() != tenant.slug:
        return await erasure_view(c, status=422, error=c.t("data.wrong_slug", slug=tenant.slug), failed=tenant_id)
    try:
        await data_endpoints.admin_confirm_erasure_request(tenant_id, c.request, c.who)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await erasure_view(c, status=problem.status, error=problem.detail, failed=tenant_id)
    return c.redirect("/platform/erasure-requests", done="erasure_confirmed")
