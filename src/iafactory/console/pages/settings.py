"""Tenant settings: what the API lets the tenant change. The tenant's name and contact (PATCH
/api/v1/tenant: owners) and the billing contact (PATCH /api/v1/billing-account: admins); region,
plan, status and limits belong to the platform, shown here read-only."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from pydantic import ValidationError

from iafactory.billing import endpoints as billing_endpoints
from iafactory.billing.schemas import BillingAccountUpdate
from iafactory.console.web import Ctx, page
from iafactory.http.problems import Problem
from iafactory.tenancy import endpoints as tenancy_endpoints
from iafactory.tenancy.schemas import TenantUpdate

CURRENCIES = ("DZD", "CHF", "EUR", "CAD")
DONE = frozenset({"tenant_saved", "billing_saved"})


async def view(c: Ctx, *, status: int = 200, error: str | None = None, **form: Any) -> Response:
    async with c.tenant(read_only=True, role="viewer") as s:
        tenant = await tenancy_endpoints.get_tenant(s)
        billing = await billing_endpoints.get_billing_account(s)
    done = c.request.query_params.get("done")
    return c.render(
        "settings.html",
        status=status,
        title=c.t("settings.title"),
        tenant={**tenant, **form.get("tenant", {})},
        billing={**billing, **form.get("billing", {})},
        currencies=CURRENCIES,
        error=error,
        done=done if done in DONE else None,
    )


@page("GET", "/settings", role="viewer", api="GET /api/v1/tenant")
async def settings_page(c: Ctx) -> Response:
    return await view(c)


def _messages(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors())


@page("POST", "/settings/tenant", role="owner", api="PATCH /api/v1/tenant")
async def save_tenant(c: Ctx) -> Response:
    values = {
        "name": c.form.get("name", "").strip(),
        "admin_email": c.form.get("admin_email", "").strip() or None,
        "admin_phone": c.form.get("admin_phone", "").strip() or None,
    }
    try:
        body = TenantUpdate.model_validate(values)
    except ValidationError as err:
        return await view(c, status=422, error=_messages(err), tenant=values)
    try:
        async with c.tenant() as s:
            await tenancy_endpoints.update_tenant(body, s)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail, tenant=values)
    return c.redirect("/settings", done="tenant_saved")


@page("POST", "/settings/billing", role="admin", api="PATCH /api/v1/billing-account")
async def save_billing(c: Ctx) -> Response:
    values = {
        "billing_name": c.form.get("billing_name", "").strip(),
        "billing_email": c.form.get("billing_email", "").strip() or None,
        "address": c.form.get("address", "").strip(),
        "vat_number": c.form.get("vat_number", "").strip() or None,
        "currency": c.form.get("currency", ""),
    }
    try:
        body = BillingAccountUpdate.model_validate(values)
    except ValidationError as err:
        return await view(c, status=422, error=_messages(err), billing=values)
    try:
        async with c.tenant() as s:
            await billing_endpoints.update_billing_account(body, s)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail, billing=values)
    return c.redirect("/settings", done="billing_saved")
