"""The HTTP service end to end: sign in, select a tenant, create and read a record, and the
problem+json answers for the common mistakes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api_support import ApiWorld

pytestmark = pytest.mark.anyio


async def test_login_create_list_get(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    r = await c.post(
        "/api/v1/projects", json={"name": "Rentrée 2026", "settings": {"lang": "fr"}}, headers=a.auth("member")
    )
    assert r.status_code == 201, r.text
    project = r.json()
    r = await c.get("/api/v1/projects", headers=a.auth("viewer"))
    assert r.status_code == 200
    assert [p["id"] for p in r.json()["items"]] == [project["id"]]
    r = await c.get(f"/api/v1/projects/{project['id']}", headers=a.key("read"))
    assert r.status_code == 200 and r.json()["name"] == "Rentrée 2026"


async def test_a_tenant_id_in_the_body_is_refused(api_world: ApiWorld) -> None:
    r = await api_world.client.post(
        "/api/v1/projects", json={"name": "x", "tenant_id": str(api_world.b.id)}, headers=api_world.a.auth("owner")
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"] == "body.tenant_id"


async def test_another_tenants_id_answers_like_a_missing_one(api_world: ApiWorld) -> None:
    c = api_world.client
    r = await c.post("/api/v1/projects", json={"name": "secret"}, headers=api_world.b.auth("owner"))
    theirs = r.json()["id"]
    other = await c.get(f"/api/v1/projects/{theirs}", headers=api_world.a.auth("owner"))
    missing = await c.get(f"/api/v1/projects/{theirs + 10_000}", headers=api_world.a.auth("owner"))
    assert other.status_code == missing.status_code == 404

    def strip(body: dict[str, Any], ident: int) -> dict[str, str]:
        return {k: re.sub(rf"\b{ident}\b", "ID", str(v)) for k, v in body.items() if k != "request_id"}

    assert strip(other.json(), theirs) == strip(missing.json(), theirs + 10_000)


async def test_values_postgresql_cannot_store_are_a_422_not_a_500(api_world: ApiWorld) -> None:
    c, owner = api_world.client, api_world.a.auth("owner")
    r = await c.post("/api/v1/projects", json={"name": "nul\u0000byte"}, headers=owner)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    r = await c.get("/api/v1/projects?cursor=not-a-cursor", headers=owner)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.cursor"
    r = await c.get(f"/api/v1/projects/{2**63}", headers=owner)
    assert r.status_code in (404, 422) and r.status_code != 500


def problem_fields(r) -> list[str]:  # an httpx.Response
    """The fields a 422 names; every 422 has the same shape (problem+json with `errors`)."""
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"].endswith("/validation") and body["title"] == "Validation failed", body
    assert body["errors"] and all(set(e) == {"field", "message", "type"} for e in body["errors"]), body
    return [e["field"] for e in body["errors"]]


async def test_every_422_has_errors_naming_the_field(api_world: ApiWorld) -> None:
    c, owner = api_world.client, api_world.a.auth("owner")
    summary = "/api/v1/usage/summary"
    # A date-time without a time zone (this one used to answer a 422 without `errors`).
    r = await c.get(f"{summary}?from=2026-11-01T00:00:00&to=2026-12-01T00:00:00Z", headers=owner)
    assert problem_fields(r) == ["query.from"]
    assert "time zone" in r.json()["errors"][0]["message"] or "timezone" in r.json()["errors"][0]["message"]
    r = await c.get(f"{summary}?from=2026-11-01&to=2026-12-01T00:00:00", headers=owner)
    assert problem_fields(r) == ["query.from", "query.to"]
    r = await c.get(f"{summary}?from=2026-12-01T00:00:00Z&to=2026-11-01T00:00:00Z", headers=owner)
    assert problem_fields(r) == ["query.from"]
    # Raised by handlers and by the database.
    assert problem_fields(await c.patch("/api/v1/tenant", json={"name": None}, headers=owner)) == ["body.name"]
    assert problem_fields(await c.get("/api/v1/projects?cursor=not-a-cursor", headers=owner)) == ["query.cursor"]
    assert problem_fields(await c.post("/api/v1/projects", json={"name": "nul\u0000byte"}, headers=owner))
