"""Your data: the tenant's export as a download (admins, as GET /api/v1/tenant/export) and the
erasure request that a platform administrator confirms (owners request and cancel, as POST
/api/v1/tenant/erasure-requests[/cancel]; admins see the requests). The same functions as the
API's routes (tenancy/data_rights.py, tenancy/data_endpoints.py), in the request's tenant
transaction; the erasure itself is an operator's command (README.md)."""

from __future__ import annotations

from fastapi import Response

from iafactory.console.web import Ctx, page
from iafactory.http.problems import Problem
from iafactory.tenancy import data_endpoints, data_rights
from iafactory.tenancy import endpoints as tenancy_endpoints
from iafactory.tenancy.data_endpoints import ErasureRequestIn

DONE = frozenset({"erasure_requested", "erasure_cancelled"})


async def view(c: Ctx, *, status: int = 200, error: str | None = None, reason: str = "") -> Response:
    requests: list[dict] = []
    async with c.tenant(read_only=True, role="viewer") as s:
        tenant = await tenancy_endpoints.get_tenant(s)
        cell = s.cell or c.request.app.state.cells.home
    if c.can("admin"):
        async with c.tenant(read_only=True, role="admin") as s:
            requests = await data_rights.erasure_requests(s.tx, s.ctx.tenant_id)
    done = c.request.query_params.get("done")
    return c.render(
        "data.html",
        status=status,
        title=c.t("data.title"),
        tenant=tenant,
        cell=cell,
        requests=requests,
        open_request=next((r for r in requests if r["status"] in ("pending", "confirmed")), None),
        error=error,
        reason=reason,
        done=done if done in DONE else None,
    )


@page("GET", "/data", role="viewer", api="GET /api/v1/tenant")
async def data_page(c: Ctx) -> Response:
    return await view(c)


@page("GET", "/data/export", role="admin", api="GET /api/v1/tenant/export")
async def download_export(c: Ctx) -> Response:
    async with c.tenant(read_only=False) as s:
        body, name = await data_endpoints.export_of(s, c.request)
    return c.finish(
        Response(
            content=body,
            media_type=data_endpoints.ARCHIVE_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"},
        )
    )


@page("POST", "/data/erasure", role="owner", api="POST /api/v1/tenant/erasure-requests")
async def request_erasure(c: Ctx) -> Response:
    reason = c.form.get("reason", "").strip()
    slug = (c.layout or {})["tenant"].slug
    if c.form.get("confirm", "").strip() != slug:
        return await view(c, status=422, error=c.t("data.wrong_slug", slug=slug), reason=reason)
    if len(reason) > 2000:
        return await view(c, status=422, error="reason: at most 2000 characters", reason=reason)
    async with c.tenant() as s:
        await data_endpoints.request_erasure(ErasureRequestIn(reason=reason), c.request, s)
    return c.redirect("/data", done="erasure_requested")


@page("POST", "/data/erasure/cancel", role="owner", api="POST /api/v1/tenant/erasure-requests/cancel")
async def cancel_erasure(c: Ctx) -> Response:
    try:
        async with c.tenant() as s:
            await data_endpoints.cancel_erasure_request(c.request, s)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail)
    return c.redirect("/data", done="erasure_cancelled")
