"""Region cells through the API: residency proven by scanning every table of every database, and
routing that fails closed (issue 12).

Two cells and a directory on the test server: tenant A lives in cell eu (CH), tenant B in cell dz
(DZ). Records of every type are created through the API, then each database is read as its owner.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from api_support import (
    API_PREFIX,
    PASSWORD,
    TWO_CELLS,
    ApiWorld,
    Seeder,
    build_world,
    login,
    offline_openapi,
    tenant_writable_collections,
    two_cell_client,
    two_cell_databases,
)
from iafactory.auth import api_keys, tokens
from iafactory.cells.directory import email_hash

pytestmark = pytest.mark.anyio
DOC = offline_openapi()


@pytest.fixture(scope="module")
def cell_urls(server_url: str) -> Any:
    with two_cell_databases(server_url) as urls:
        yield urls


@pytest.fixture(scope="module")
async def world(cell_urls: dict[str, str]) -> AsyncIterator[ApiWorld]:
    async with two_cell_client(cell_urls) as (client, admin_url, settings):
        yield await build_world(client, admin_url, settings, cell_urls)


@pytest.fixture(scope="module")
async def seeded(world: ApiWorld) -> dict[str, Seeder]:
    """One record of every type each tenant can create, made through the API."""
    seeders = {}
    for name, t in (("a", world.a), ("b", world.b)):
        seeder = Seeder(world.client, DOC, f"{name}{uuid.uuid4().hex[:8]}", t.auth("owner"), t.region)
        for path, op in tenant_writable_collections(DOC).items():
            if op.method == "POST":
                if not seeder.ids.get(path):
                    await seeder.create(path)
            else:
                await seeder.write(op)
        seeders[name] = seeder
    return seeders


def tenant_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [
            r[0]
            for r in conn.execute(
                """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
                   WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"""
            )
        ]


def rows_by_tenant(url: str) -> dict[str, dict[uuid.UUID, int]]:
    """For each tenant table: tenant id -> row count, read as the owner (no RLS in the way)."""
    out: dict[str, dict[uuid.UUID, int]] = {}
    with psycopg.connect(url) as conn:
        for table in tenant_tables(url):
            out[table] = dict(
                conn.execute(f'SELECT tenant_id, count(*) FROM "{table}" GROUP BY tenant_id').fetchall()  # type: ignore[arg-type]
            )
        out["tenants"] = {r[0]: 1 for r in conn.execute("SELECT id FROM tenants")}
    return out


def every_text(url: str) -> str:
    """Every value of every user table of a database, as one text (for looking for emails)."""
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            """SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg_toast%'"""
        ).fetchall()
        return "\n".join(str(conn.execute(f"SELECT t::text FROM {t} t").fetchall()) for (t,) in tables)


async def test_each_tenants_rows_live_only_in_its_cell_and_the_directory_holds_none(
    world: ApiWorld, seeded: dict[str, Seeder], cell_urls: dict[str, str]
) -> None:
    homes = {world.a.id: "eu", world.b.id: "dz"}
    for cell in TWO_CELLS:
        found = rows_by_tenant(cell_urls[cell])
        for table, counts in found.items():
            for tenant_id, home in homes.items():
                if home == cell:
                    continue
                assert tenant_id not in counts, f"{table} of cell {cell} holds rows of a tenant of cell {home}"
        # Every record type the API created is there, in its own cell.
        own = next(t for t, h in homes.items() if h == cell)
        populated = {table for table, counts in found.items() if own in counts}
        assert len(populated) >= 15, f"cell {cell}: only {sorted(populated)} hold the tenant's rows"

    # The directory: routes only. No row in any tenant table, no user, no plaintext email.
    directory = rows_by_tenant(cell_urls["directory"])
    assert {table: counts for table, counts in directory.items() if counts} == {}
    with psycopg.connect(cell_urls["directory"]) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
        routes = dict(conn.execute("SELECT id, cell FROM directory.tenants").fetchall())  # type: ignore[arg-type]
        hashes = {bytes(h) for (h,) in conn.execute("SELECT email_hmac FROM directory.logins")}
    assert routes[world.a.id] == "eu" and routes[world.b.id] == "dz"
    text = every_text(cell_urls["directory"])
    with psycopg.connect(cell_urls["eu"]) as conn:
        emails = [e for (e,) in conn.execute("SELECT email FROM users")]
    assert emails and email_hash(world.settings, emails[0]) in hashes
    assert "@" not in text, "the directory holds something that looks like an email"
    assert "Tenant A" not in text and "Tenant B" not in text  # nor a tenant's name


async def test_a_cell_refuses_a_tenant_of_a_foreign_region_even_from_the_owner(cell_urls: dict[str, str]) -> None:
    for cell, region in (("eu", "DZ"), ("dz", "CH"), ("directory", "CH")):
        with psycopg.connect(cell_urls[cell], autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO tenants (id, name, slug, region) VALUES (gen_random_uuid(), 'x', %s, %s)",
                (f"foreign-{uuid.uuid4().hex[:6]}", region),
            )


def _tamper(token: str, **claims: Any) -> str:
    """The token with its payload changed and the signature left as it was."""
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    raw = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{raw}.{signature}"


async def test_a_credential_is_served_only_by_the_cell_the_directory_names(world: ApiWorld) -> None:
    c, a = world.client, world.a
    assert (await c.get(f"{API_PREFIX}/tenant", headers=a.auth("owner"))).json()["id"] == str(a.id)
    # A validly signed token whose cell disagrees with the directory: refused, never answered elsewhere.
    wrong_cell, _ = tokens.issue(world.settings, a.user_ids["owner"], tenant_id=a.id, role="owner", cell="dz")
    r = await c.get(f"{API_PREFIX}/tenant", headers=world.headers(wrong_cell))
    assert r.status_code == 401 and "tenant is in cell 'eu'" in r.json()["detail"]
    unknown_cell, _ = tokens.issue(world.settings, a.user_ids["owner"], tenant_id=a.id, role="owner", cell="mars")
    assert (await c.get(f"{API_PREFIX}/tenant", headers=world.headers(unknown_cell))).status_code == 401
    # A tenant the directory does not know.
    stray, _ = tokens.issue(world.settings, a.user_ids["owner"], tenant_id=uuid.uuid4(), role="owner", cell="eu")
    r = await c.get(f"{API_PREFIX}/tenant", headers=world.headers(stray))
    assert r.status_code == 401 and r.json()["detail"] == "unknown tenant"
    # The cell claim edited in a real token: the signature no longer matches.
    edited = _tamper(a.tokens["owner"], cell="dz", tenant_id=str(world.b.id))
    r = await c.get(f"{API_PREFIX}/tenant", headers=world.headers(edited))
    assert r.status_code == 401 and "signature" in r.json()["detail"]

    # An API key names its cell; moved to another cell's name (checksum recomputed), it is unknown there.
    key = a.keys["write"]
    prefix, cell = api_keys.parse_prefix(key)  # type: ignore[misc]
    assert cell == "eu" and prefix.startswith("iaf_live_eu_")
    body = key[:-6].replace("iaf_live_eu_", "iaf_live_dz_", 1)
    forged = body + api_keys._checksum(body)
    assert api_keys.parse_prefix(forged) == (prefix.replace("_eu_", "_dz_"), "dz")
    r = await c.get(f"{API_PREFIX}/projects", headers={"X-API-Key": forged})
    assert r.status_code == 401 and r.json()["detail"] == "unknown API key"
    assert (await c.get(f"{API_PREFIX}/projects", headers={"X-API-Key": key})).status_code == 200


async def test_a_person_with_accounts_in_two_cells_signs_in_once_and_reaches_both(world: ApiWorld) -> None:
    c = world.client
    r = await c.get(f"{API_PREFIX}/me/tenants", headers=world.headers(world.both_user_token))
    assert r.status_code == 200, r.text
    assert {(t["slug"], t["cell"]) for t in r.json()} == {(world.a.slug, "eu"), (world.b.slug, "dz")}
    for t, cell in ((world.b, "dz"), (world.a, "eu")):
        r = await c.post(
            f"{API_PREFIX}/auth/select-tenant", json={"tenant": t.slug}, headers=world.headers(world.both_user_token)
        )
        assert r.status_code == 200, r.text
        assert r.json()["tenant"]["cell"] == cell
        token = r.json()["access_token"]
        assert (await c.get(f"{API_PREFIX}/tenant", headers=world.headers(token))).json()["slug"] == t.slug
        me = (await c.get(f"{API_PREFIX}/me", headers=world.headers(token))).json()
        assert me["tenant"]["slug"] == t.slug and len(me["tenants"]) == 2


async def test_registration_places_the_account_in_the_cell_of_its_region(
    world: ApiWorld, cell_urls: dict[str, str]
) -> None:
    email = f"secretaire-{uuid.uuid4().hex[:6]}@ecole.dz"
    r = await world.client.post(
        f"{API_PREFIX}/auth/register", json={"email": email, "password": PASSWORD, "region": "DZ"}
    )
    assert r.status_code == 202, r.text
    for cell, expected in (("dz", 1), ("eu", 0), ("directory", 0)):
        with psycopg.connect(cell_urls[cell]) as conn:
            assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone()[0] == expected
    token = await login(world.client, email)
    me = (await world.client.get(f"{API_PREFIX}/me", headers=world.headers(token))).json()
    assert me["user"]["email"] == email and me["tenants"] == []
    r = await world.client.post("/api/v1/auth/login", json={"email": email, "password": "not the password"})
    assert r.status_code == 401


async def test_platform_views_read_the_directory_and_new_tenants_land_in_their_region(
    world: ApiWorld, cell_urls: dict[str, str]
) -> None:
    c, h = world.client, world.headers(world.platform_token)
    r = await c.get(f"{API_PREFIX}/admin/tenants", params={"limit": 100}, headers=h)
    assert r.status_code == 200, r.text
    slugs = {t["slug"] for t in r.json()["items"]}
    assert {world.a.slug, world.b.slug} <= slugs
    only_dz = await c.get(f"{API_PREFIX}/admin/tenants", params={"region": "DZ"}, headers=h)
    assert {t["region"] for t in only_dz.json()["items"]} == {"DZ"}

    slug = f"lycee-oran-{uuid.uuid4().hex[:6]}"
    body = {"name": "Lycée d'Oran", "slug": slug, "region": "DZ", "plan": "free"}
    r = await c.post(f"{API_PREFIX}/admin/tenants", json=body, headers=h)
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    for cell, expected in (("dz", 1), ("eu", 0)):
        with psycopg.connect(cell_urls[cell]) as conn:
            assert conn.execute("SELECT count(*) FROM tenants WHERE slug = %s", (slug,)).fetchone()[0] == expected
    with psycopg.connect(cell_urls["directory"]) as conn:
        assert conn.execute("SELECT cell FROM directory.tenants WHERE slug = %s", (slug,)).fetchone()[0] == "dz"
    # The slug is taken across cells: a CH tenant cannot have it either, and nothing is half-written.
    taken = await c.post(f"{API_PREFIX}/admin/tenants", json={**body, "region": "CH"}, headers=h)
    assert taken.status_code == 409
    with psycopg.connect(cell_urls["eu"]) as conn:
        assert conn.execute("SELECT count(*) FROM tenants WHERE slug = %s", (slug,)).fetchone()[0] == 0
    r = await c.patch(f"{API_PREFIX}/admin/tenants/{tenant_id}", json={"plan": "pro"}, headers=h)
    assert r.status_code == 200 and r.json()["plan"] == "pro"
    with psycopg.connect(cell_urls["directory"]) as conn:
        assert conn.execute("SELECT plan FROM directory.tenants WHERE slug = %s", (slug,)).fetchone()[0] == "pro"
    # Someone who is no platform administrator sees nothing of the registry.
    r = await c.get(f"{API_PREFIX}/admin/tenants", headers=world.headers(world.a.tokens["owner"]))
    assert r.status_code == 403


async def test_readiness_names_the_directory_and_each_cell(world: ApiWorld) -> None:
    app_checks = (await world.client.get("/readyz")).json()["checks"]
    assert set(app_checks) >= {"directory", "cell dz", "cell eu"}


# Last in the module: it ends every session of the world's person of both cells.
async def test_sessions_of_a_person_with_accounts_in_two_cells(world: ApiWorld, cell_urls: dict[str, str]) -> None:
    """The session lives in the cell of the token's `cell` claim: a sign-in before any tenant is
    selected in the first account's cell; select-tenant into the other cell starts one there. A
    refresh reissues for the same cell, accounts and tenant; the list and logout-all span both."""
    c = world.client
    email = (await c.get(f"{API_PREFIX}/me", headers=world.headers(world.both_user_token))).json()["user"]["email"]
    signed = (await c.post(f"{API_PREFIX}/auth/login", json={"email": email, "password": PASSWORD})).json()
    first_cell = tokens.verify(world.settings, signed["access_token"]).cell
    other = "dz" if first_cell == "eu" else "eu"
    target = world.b if other == "dz" else world.a
    r = await c.post(
        f"{API_PREFIX}/auth/select-tenant", json={"tenant": target.slug}, headers=world.headers(signed["access_token"])
    )
    assert r.status_code == 200, r.text
    chosen = r.json()
    claims = tokens.verify(world.settings, chosen["access_token"])
    assert (
        claims.cell == other and claims.session_id != tokens.verify(world.settings, signed["access_token"]).session_id
    )
    with psycopg.connect(cell_urls[other]) as conn:
        row = conn.execute("SELECT selected_tenant FROM user_sessions WHERE id = %s", (claims.session_id,)).fetchone()
        assert row == (target.id,)
    with psycopg.connect(cell_urls["directory"]) as conn:  # the directory holds no session
        assert conn.execute("SELECT count(*) FROM user_sessions").fetchone() == (0,)

    r = await c.post(f"{API_PREFIX}/auth/refresh", json={"refresh_token": chosen["refresh_token"]})
    assert r.status_code == 200, r.text
    refreshed = r.json()
    again = tokens.verify(world.settings, refreshed["access_token"])
    assert (again.cell, again.tenant_id, again.session_id) == (other, target.id, claims.session_id)
    assert dict(again.accounts) == dict(claims.accounts) and len(again.accounts) == 2
    assert (await c.get(f"{API_PREFIX}/tenant", headers=world.headers(refreshed["access_token"]))).json()[
        "slug"
    ] == target.slug

    r = await c.get(f"{API_PREFIX}/me/sessions", headers=world.headers(refreshed["access_token"]))
    assert r.status_code == 200, r.text
    cells = {s["cell"] for s in r.json()}
    assert cells == {"eu", "dz"}
    assert [s["cell"] for s in r.json() if s["current"]] == [other]

    r = await c.post(f"{API_PREFIX}/auth/logout-all", headers=world.headers(signed["access_token"]))
    assert r.status_code == 204, r.text
    for token in (signed["access_token"], refreshed["access_token"], world.both_user_token):
        assert (await c.get(f"{API_PREFIX}/me", headers=world.headers(token))).status_code == 401
    assert (await c.get(f"{API_PREFIX}/tenant", headers=world.headers(refreshed["access_token"]))).status_code == 401
