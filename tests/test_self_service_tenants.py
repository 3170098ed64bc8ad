"""Self-service tenants (issue 13): a signed-in user creates a tenant of their own over HTTP
(POST /api/v1/tenants) and becomes its owner, on plan free with a 14-day trial; the platform can
turn it off; the slug is unique (across cells too) and a refusal leaves nothing behind; with region
cells the tenant lives in the cell of its region, where the caller needs an account."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from api_support import API_PREFIX, app_client, login, two_cell_client, two_cell_databases, verified_user

pytestmark = pytest.mark.anyio
URL = f"{API_PREFIX}/tenants"


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _body(region: str = "CH", **extra: Any) -> dict[str, Any]:
    return {"name": "Cabinet Dupont", "slug": f"cabinet-{uuid.uuid4().hex[:8]}", "region": region, **extra}


def _one(url: str, query: str, *args: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, args).fetchone()
        assert row is not None
        return row[0]


@pytest.fixture
async def client(migrated_db: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(migrated_db) as (c, _, _settings):
        yield c


async def _new_user(c: httpx.AsyncClient, url: str, region: str | None = None) -> str:
    """A signed-in account whose address is verified (`url`: the database of its cell)."""
    return await login(c, await verified_user(c, url, "selfserve", region))


async def test_a_signed_in_user_creates_a_tenant_owns_it_and_selects_it(
    client: httpx.AsyncClient, migrated_db: str
) -> None:
    token = await _new_user(client, migrated_db)
    body = _body()
    r = await client.post(URL, json=body, headers=_h(token))
    assert r.status_code == 201, r.text
    tenant = r.json()
    assert (tenant["slug"], tenant["plan"], tenant["status"], tenant["region"]) == (body["slug"], "free", "trial", "CH")
    created = datetime.fromisoformat(tenant["created_at"])
    assert datetime.fromisoformat(tenant["trial_ends_at"]) - created == timedelta(days=14)

    r = await client.post(f"{API_PREFIX}/auth/select-tenant", json={"tenant": body["slug"]}, headers=_h(token))
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["role"] == "owner"
    owner = r.json()["access_token"]
    r = await client.get(f"{API_PREFIX}/tenant", headers=_h(owner))
    assert r.status_code == 200 and r.json()["id"] == tenant["id"], r.text
    members = (await client.get(f"{API_PREFIX}/members", headers=_h(owner))).json()
    assert [m["role"] for m in members] == ["owner"]
    # Audited in the same transaction, with the actor and the request id (the ASGI test client has
    # no IP address to record).
    assert (
        _one(
            migrated_db,
            "SELECT count(*) FROM audit_events WHERE tenant_id = %s AND action = 'tenant.created' "
            "AND actor_user_id IS NOT NULL AND request_id IS NOT NULL",
            uuid.UUID(tenant["id"]),
        )
        == 1
    )


async def test_a_taken_slug_answers_409_and_writes_nothing(client: httpx.AsyncClient, migrated_db: str) -> None:
    first, second = await _new_user(client, migrated_db), await _new_user(client, migrated_db)
    body = _body()
    assert (await client.post(URL, json=body, headers=_h(first))).status_code == 201
    before = _one(migrated_db, "SELECT count(*) FROM audit_events")
    r = await client.post(URL, json={**body, "name": "Someone else"}, headers=_h(second))
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert _one(migrated_db, "SELECT count(*) FROM tenants WHERE slug = %s", body["slug"]) == 1
    assert _one(migrated_db, "SELECT count(*) FROM tenants WHERE name = 'Someone else'") == 0
    assert _one(migrated_db, "SELECT count(*) FROM audit_events") == before
    assert (await client.get(f"{API_PREFIX}/me/tenants", headers=_h(second))).json() == []


async def test_one_account_owns_at_most_three_trial_tenants(client: httpx.AsyncClient, migrated_db: str) -> None:
    token = await _new_user(client, migrated_db)
    for _ in range(3):
        assert (await client.post(URL, json=_body(), headers=_h(token))).status_code == 201
    r = await client.post(URL, json=_body(), headers=_h(token))
    assert r.status_code == 403 and "trial" in r.json()["detail"], r.text
    assert len((await client.get(f"{API_PREFIX}/me/tenants", headers=_h(token))).json()) == 3


async def test_the_platform_can_turn_self_service_off(migrated_db: str) -> None:
    async with app_client(migrated_db, self_service_tenants=False) as (c, _, _settings):
        token = await _new_user(c, migrated_db)
        body = _body()
        r = await c.post(URL, json=body, headers=_h(token))
        assert r.status_code == 403, r.text
        assert r.json()["type"].endswith("self-service-disabled") and "turned off" in r.json()["detail"]
        assert _one(migrated_db, "SELECT count(*) FROM tenants WHERE slug = %s", body["slug"]) == 0


async def test_it_needs_a_signed_in_user(client: httpx.AsyncClient) -> None:
    assert (await client.post(URL, json=_body())).status_code == 401


@pytest.fixture
def cell_urls(server_url: str) -> Any:
    with two_cell_databases(server_url) as urls:
        yield urls


async def test_with_two_cells_a_dz_tenant_lands_in_cell_dz_and_needs_an_account_there(
    cell_urls: dict[str, str],
) -> None:
    urls = cell_urls
    async with two_cell_client(urls) as (c, _, _settings):
        dz = await _new_user(c, urls["dz"], "DZ")
        body = _body("DZ", name="Lycée d'Oran")
        r = await c.post(URL, json=body, headers=_h(dz))
        assert r.status_code == 201, r.text
        slug = body["slug"]
        for cell, expected in (("dz", 1), ("eu", 0)):
            assert _one(urls[cell], "SELECT count(*) FROM tenants WHERE slug = %s", slug) == expected
        assert _one(urls["directory"], "SELECT cell FROM directory.tenants WHERE slug = %s", slug) == "dz"
        r = await c.post(f"{API_PREFIX}/auth/select-tenant", json={"tenant": slug}, headers=_h(dz))
        assert r.status_code == 200 and r.json()["tenant"]["cell"] == "dz", r.text
        r = await c.get(f"{API_PREFIX}/tenant", headers=_h(r.json()["access_token"]))
        assert r.status_code == 200 and r.json()["slug"] == slug, r.text

        # Someone with an account in the eu cell only: refused, and told to register in DZ.
        ch = await _new_user(c, urls["eu"], "CH")
        other = _body("DZ")
        r = await c.post(URL, json=other, headers=_h(ch))
        assert r.status_code == 403, r.text
        assert r.json()["type"].endswith("no-account-in-region") and "register" in r.json()["detail"]
        for name in ("dz", "eu"):
            assert _one(urls[name], "SELECT count(*) FROM tenants WHERE slug = %s", other["slug"]) == 0
        assert _one(urls["directory"], "SELECT count(*) FROM directory.tenants WHERE slug = %s", other["slug"]) == 0

        # The slug is taken across cells: a CH tenant cannot have it, and nothing is half-written.
        r = await c.post(URL, json={**body, "region": "CH"}, headers=_h(ch))
        assert r.status_code == 409, r.text
        assert _one(urls["eu"], "SELECT count(*) FROM tenants WHERE slug = %s", slug) == 0
        assert _one(urls["directory"], "SELECT count(*) FROM directory.tenants WHERE slug = %s", slug) == 1
        # A slug the directory takes but the cell refuses (here: a fourth trial) leaves no directory row.
        for _ in range(3):
            assert (await c.post(URL, json=_body("CH"), headers=_h(ch))).status_code == 201
        fourth = _body("CH")
        r = await c.post(URL, json=fourth, headers=_h(ch))
        assert r.status_code == 403, r.text
        assert _one(urls["directory"], "SELECT count(*) FROM directory.tenants WHERE slug = %s", fourth["slug"]) == 0
