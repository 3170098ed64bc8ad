"""API keys: list (with last use), create (the secret shown once, on the answer to the form
itself: it is never stored, so never shown again), revoke. The API's handlers and roles: listing
for viewers, creating and revoking for admins."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from fastapi import Response
from pydantic import ValidationError

from iafactory.auth import endpoints as auth_endpoints
from iafactory.auth.schemas import ApiKeyCreate
from iafactory.console.web import Ctx, page
from iafactory.http.idempotency import Idempotency
from iafactory.http.problems import Problem

DONE = frozenset({"revoked"})


async def view(
    c: Ctx,
    *,
    status: int = 200,
    error: str | None = None,
    created: dict | None = None,
    name: str = "",
    scope: str = "read",
) -> Response:
    async with c.tenant(read_only=True, role="viewer") as s:
        keys = await auth_endpoints.list_api_keys(s)
    done = c.request.query_params.get("done")
    return c.render(
        "api_keys.html",
        status=status,
        title=c.t("keys.title"),
        keys=keys,
        created=created,
        error=error,
        done=done if done in DONE else None,
        name=name,
        scope=scope,
        now=datetime.now(UTC),
    )


@page("GET", "/api-keys", role="viewer", api="GET /api/v1/api-keys")
async def keys_page(c: Ctx) -> Response:
    return await view(c)


@page("POST", "/api-keys", role="admin", api="POST /api/v1/api-keys")
async def create_key(c: Ctx) -> Response:
    name, scope = c.form.get("name", "").strip(), c.form.get("scope", "read")
    expires = c.form.get("expires_at") or None
    try:
        body = ApiKeyCreate.model_validate(
            {"name": name, "scope": scope, "expires_at": f"{expires}T00:00:00Z" if expires else None}
        )
    except ValidationError as err:
        message = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        return await view(c, status=422, error=message, name=name, scope=scope)
    try:
        async with c.tenant() as s:
            created = await auth_endpoints.create_api_key(body, c.request, s, Idempotency(None, c.request))
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail, name=name, scope=scope)
    return await view(c, status=201, created=created)


@page(
    "POST",
    "/api-keys/{key_id:uuid}/revoke",
    role="admin",
    api="DELETE /api/v1/api-keys/{key_id}",
    params={"key_id": "api_key"},
)
async def revoke_key(c: Ctx) -> Response:
    key_id: UUID = c.request.path_params["key_id"]
    try:
        async with c.tenant() as s:
            await auth_endpoints.revoke_api_key(key_id, c.request, s)
    except Problem as problem:
        if problem.status in (401, 403):
            raise
        return await view(c, status=problem.status, error=problem.detail)
    return c.redirect("/api-keys", done="revoked")
