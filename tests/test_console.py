"""The web console over HTTP: sign-in, cookie session, CSRF, roles and tenant isolation.

The role and isolation checks are generated from the console's own route table
(iafactory.console.web.ROUTES), the way tests/test_api_isolation_matrix.py is generated from the
API's: a console route added later is covered without editing this file, and fails
`test_every_route_is_classified` if it names something (a path parameter) the generator cannot
fill with tenant B's records.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import psycopg
import pytest

from api_support import (
    PASSWORD,
    ApiWorld,
    api_operations,
    build_world,
    login,
    offline_openapi,
    provision_for_load,
    queued_email,
    register_user,
    required_role,
    two_cell_client,
    two_cell_databases,
    verification_token,
)
from conftest import settings_for
from console_support import Console, both_email, csrf_of, email_of, platform_email
from iafactory.console import i18n, load_pages
from iafactory.console.messages import MESSAGES
from iafactory.console.web import ROUTES, ConsoleRoute
from iafactory.db import bootstrap
from iafactory.notifications import sender
from iafactory.tenancy.context import ROLE_RANK
from test_outbox import Inbox, smtp, smtp_mailer  # noqa: F401 - smtp is a fixture

pytestmark = pytest.mark.anyio

# With IAFACTORY_TEST_CELLS=2 (CI's PostgreSQL 15 pass) the world lives in two region cells.
RUNS_ON_TWO_CELLS = True

load_pages()  # the page modules register their routes when imported
TENANT_ROUTES = [r for r in ROUTES if r.role is not None]
PLATFORM_ROUTES = [r for r in ROUTES if r.platform]
# What a path parameter may name, and how the generated tests find such a record of tenant B.
PARAM_KINDS = ("member", "invitation", "api_key", "tenant", "knowledge_file")
DOC = offline_openapi()
API_OPERATIONS = {op.label for op in api_operations(DOC)}
_PARAM = re.compile(r"\{([a-z_]+)(?::[a-z]+)?\}")


def concrete(route: ConsoleRoute, ids: dict[str, Any]) -> str:
    return _PARAM.sub(lambda m: str(ids[route.params[m.group(1)]]), route.full_path)


@pytest.fixture(scope="module")
async def world(module_api_world: ApiWorld, module_db: str) -> ApiWorld:
    await provision_for_load(module_db, module_api_world)
    return module_api_world


async def b_records(w: ApiWorld) -> dict[str, Any]:
    """One record of tenant B of each kind a console path parameter may name (made through the
    API as B's admin), and what B's own reads show of them."""
    h = w.b.auth("owner")
    r = await w.client.post(
        "/api/v1/members/invitations", json={"email": f"b-{uuid.uuid4().hex[:8]}@example.ch"}, headers=h
    )
    assert r.status_code == 201, r.text
    keys = (await w.client.get("/api/v1/api-keys", headers=h)).json()
    upload = await w.client.post(
        "/api/v1/knowledge-base/files", files={"file": ("b.txt", b"Tenant B's own file.", "text/plain")}, headers=h
    )
    assert upload.status_code == 201, upload.text
    return {
        "member": w.b.user_ids["member"],
        "invitation": r.json()["id"],
        "api_key": keys[0]["id"],
        "knowledge_file": upload.json()["id"],
        "tenant": w.b.id,
    }


async def b_state(w: ApiWorld) -> tuple[Any, ...]:
    h = w.b.auth("owner")
    paths = (
        "/api/v1/members",
        "/api/v1/members/invitations",
        "/api/v1/api-keys",
        "/api/v1/tenant",
        "/api/v1/tenant/erasure-requests",
        "/api/v1/credits",
        "/api/v1/knowledge-base/files",
    )
    return tuple([(await w.client.get(path, headers=h)).json() for path in paths])


# --- the route table ---------------------------------------------------------------------------------


def test_every_route_is_classified() -> None:
    """Each path parameter names a kind the isolation test can fill; each route says which API
    operation it does the same as (or is a sign-in step), and that operation exists."""
    for route in ROUTES:
        names = set(_PARAM.findall(route.path))
        assert names == set(route.params), f"{route.label}: declare params= for {sorted(names)}"
        assert set(route.params.values()) <= set(PARAM_KINDS), f"{route.label}: teach this test {route.params}"
        if route.api is not None:
            assert route.api in API_OPERATIONS, f"{route.label}: no API operation {route.api}"
        else:
            assert route.role is None, f"{route.label}: a tenant route names the API operation whose role it takes"


@pytest.mark.parametrize("route", [r for r in ROUTES if r.api], ids=lambda r: r.label)
def test_each_route_requires_the_role_its_api_operation_requires(route: ConsoleRoute) -> None:
    """A platform page mirrors a platform operation (and the reverse): its check is the platform's."""
    method, path = route.api.split(" ", 1)  # type: ignore[union-attr]
    if route.platform or required_role(method, path) == "platform":
        assert route.platform and route.role is None and required_role(method, path) == "platform", route.label
    else:
        assert route.role == required_role(method, path), route.label


def test_console_routes_are_outside_the_openapi_document() -> None:
    """HTML pages for browsers, not API operations: the generated API matrices (roles, isolation,
    schemathesis) read the document and leave them out; this module covers them."""
    assert not [p for p in DOC["paths"] if p.startswith("/console") or p == "/accept-invitation"]


def test_every_string_exists_in_every_language() -> None:
    keys = set(MESSAGES["en"])
    for code in i18n.LANGUAGES:
        assert set(MESSAGES[code]) == keys, (code, keys ^ set(MESSAGES[code]))
        for key, text in MESSAGES[code].items():
            assert re.findall(r"\{(\w+)\}", text) == re.findall(r"\{(\w+)\}", MESSAGES["en"][key]), (code, key)


def test_every_key_a_template_uses_is_in_the_catalog() -> None:
    from importlib import resources

    used: set[str] = set()
    folder = resources.files("iafactory.console") / "templates"
    for item in folder.iterdir():
        used |= set(re.findall(r"""_\(\s*["']([\w.]+)["']""", item.read_text()))
    keys = set(MESSAGES["en"])
    # `_("role." ~ m.role)`: a family of keys, whose members the literals below check.
    missing = [k for k in used if k not in keys and not (k.endswith(".") and any(x.startswith(k) for x in keys))]
    assert used and not missing, sorted(missing)
    from iafactory.tenancy.schemas import Plan, Region, Role, Status

    for family, values in (("role.", Role), ("plan.", Plan), ("region.", Region), ("status.", Status)):
        assert {family + v for v in values.__args__} <= keys, family


# --- signing in ----------------------------------------------------------------------------------------


async def test_a_page_without_a_session_goes_to_the_sign_in_page(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        r = await c.get("/console/members")
        assert r.status_code == 303
        assert r.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fmembers"


async def test_sign_in_sets_an_httponly_samesite_cookie_and_opens_the_tenant(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        page = await c.get("/console/sign-in?next=/console/members")
        assert page.status_code == 200 and 'for="email"' in page.text and 'for="password"' in page.text
        r = await c.post(
            "/console/sign-in",
            {"email": email_of(world, "a", "admin"), "password": PASSWORD, "next": "/console/members"},
        )
        assert r.status_code == 303 and r.headers["location"] == "/console/members"
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("iaf_console="))
        flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "path", "samesite"} <= flags and "secure" not in flags, cookie
        assert "Path=/console" in cookie and "SameSite=lax" in cookie
        page = await c.get("/console/members")
        assert page.status_code == 200
        assert "Tenant A" in page.text and email_of(world, "a", "viewer") in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")


async def test_over_https_the_cookie_is_secure(world: ApiWorld) -> None:
    async with Console(world.client, base_url="https://testserver") as c:
        await c.get("/console/sign-in")
        r = await c.post("/console/sign-in", {"email": email_of(world, "a", "viewer"), "password": PASSWORD})
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("iaf_console="))
        assert "Secure" in cookie


async def test_a_wrong_password_shows_the_form_again(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.get("/console/sign-in")
        r = await c.post("/console/sign-in", {"email": email_of(world, "a", "viewer"), "password": "wrong-password"})
        assert r.status_code == 401 and 'role="alert"' in r.text
        assert "iaf_console=" not in r.headers.get("set-cookie", "")


async def test_sign_out_ends_the_api_session(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "member"))
        stolen = c.client.cookies.get("iaf_console")
        r = await c.post("/console/sign-out")
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    # The cookie's tokens (copied before) no longer work: the session ended in the database.
    async with Console(world.client) as other:
        other.client.cookies.set("iaf_console", stolen or "", domain="testserver.local", path="/console")
        r = await other.get("/console/overview")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/sign-in")
        assert 'iaf_console=""' in r.headers.get("set-cookie", "")


async def test_an_expired_access_token_is_refreshed_transparently(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        value = c.client.cookies.get("iaf_console") or ""
        access, refresh = value.split("~")
        # An access token that no longer verifies (as an expired one): the refresh token is spent.
        c.client.cookies.set("iaf_console", f"x{access}~{refresh}", domain="testserver.local", path="/console")
        r = await c.get("/console/overview")
        assert r.status_code == 200, r.text
        renewed = c.client.cookies.get("iaf_console") or ""
        assert renewed.split("~")[1] != refresh
        # The spent refresh token is not accepted again, but the renewed cookie is.
        r = await c.get("/console/members")
        assert r.status_code == 200


# --- CSRF ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", [r for r in ROUTES if r.method == "POST"], ids=lambda r: r.label)
async def test_a_post_without_the_csrf_token_is_refused(world: ApiWorld, route: ConsoleRoute) -> None:
    ids = {
        "member": world.a.user_ids["viewer"],
        "invitation": uuid.uuid4(),
        "api_key": uuid.uuid4(),
        "tenant": world.a.id,
        "knowledge_file": 2**40,
    }
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "owner"))
        before = await b_state(world), (await world.client.get("/api/v1/members", headers=world.a.auth())).json()
        r = await c.post(concrete(route, ids), {"email": "x@example.ch", "role": "viewer"}, csrf=False)
        assert r.status_code == 403 and "<html" in r.text, r.text
        r = await c.post(concrete(route, ids), {"csrf": "forged", "role": "viewer"})
        assert r.status_code == 403
        after = await b_state(world), (await world.client.get("/api/v1/members", headers=world.a.auth())).json()
        assert after == before


async def test_a_csrf_token_of_another_session_is_refused(world: ApiWorld) -> None:
    async with Console(world.client) as a, Console(world.client) as b:
        await a.sign_in(email_of(world, "a", "admin"))
        await b.sign_in(email_of(world, "a", "admin"))
        assert a.csrf != b.csrf
        r = await a.post("/console/api-keys", {"name": "csrf", "scope": "read", "csrf": b.csrf or ""})
        assert r.status_code == 403


# --- roles -----------------------------------------------------------------------------------------


ROLE_CASES = [
    pytest.param(route, role, id=f"{route.label} as {role}")
    for route in TENANT_ROUTES
    for role in ROLE_RANK
    if ROLE_RANK[role] < ROLE_RANK[route.role or "viewer"]
]


@pytest.mark.parametrize(("route", "role"), ROLE_CASES)
async def test_a_role_below_the_routes_is_refused_with_403(world: ApiWorld, route: ConsoleRoute, role: str) -> None:
    """A member cannot reach admin actions, an admin cannot change the tenant's profile...: the
    database's gate refuses them, with A's own records as targets."""
    ids = {
        "member": world.a.user_ids["viewer"],
        "invitation": uuid.uuid4(),
        "api_key": uuid.uuid4(),
        "knowledge_file": 2**40,
    }
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", role))
        r = await (c.get if route.method == "GET" else c.post)(concrete(route, ids))
        assert r.status_code == 403, (r.status_code, r.text[:500])
        assert "<html" in r.text


@pytest.mark.parametrize(
    "route", [r for r in TENANT_ROUTES if r.method == "GET" and not r.params], ids=lambda r: r.label
)
async def test_every_page_opens_for_its_role(world: ApiWorld, route: ConsoleRoute) -> None:
    """Every GET route opens for the least role it needs (a viewer for most); a download (CSV,
    archive) is a file, the others a page."""
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", route.role or "viewer"))
        r = await c.get(route.full_path)
        assert r.status_code in (200, 303), r.text
        if r.status_code == 200 and r.headers["content-type"].startswith("text/html"):
            assert "<main" in r.text
        elif r.status_code == 200:
            assert "attachment" in r.headers["content-disposition"]


async def test_admin_forms_are_not_shown_to_a_member(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "member"))
        page = (await c.get("/console/members")).text
        assert "invite-form" not in page and "/remove" not in page
        page = (await c.get("/console/api-keys")).text
        assert "key-form" not in page and "/revoke" not in page


# --- tenant isolation ----------------------------------------------------------------------------------


def a_sessions(world: ApiWorld) -> list[tuple[str, str | None]]:
    """Who of tenant A tries: its owner (every role's rights), and the person who belongs to both
    A (admin) and B (member), acting for A."""
    return [(email_of(world, "a", "owner"), None), (both_email(world), world.a.slug)]


async def test_no_page_shows_anything_of_tenant_b(world: ApiWorld) -> None:
    secrets_of_b = [world.b.slug, "Tenant B", email_of(world, "b", "viewer"), str(world.b.id)]
    for email, tenant in a_sessions(world):
        async with Console(world.client) as c:
            await c.sign_in(email, tenant=tenant)
            for route in [r for r in TENANT_ROUTES if r.method == "GET" and not r.params]:
                r = await c.get(route.full_path)
                assert r.status_code in (200, 303)
                shown = r.text
                if tenant is not None:  # the switcher lists the person's own tenants, B among them
                    shown = re.sub(r'<form class="switcher".*?</form>', "", shown, flags=re.S)
                assert not [s for s in secrets_of_b if s in shown], (email, route.label)


ISOLATION = [r for r in TENANT_ROUTES if r.params]


@pytest.mark.parametrize("route", ISOLATION, ids=lambda r: r.label)
async def test_no_form_action_reaches_a_record_of_tenant_b(world: ApiWorld, route: ConsoleRoute) -> None:
    ids = await b_records(world)
    before = await b_state(world)
    for email, tenant in a_sessions(world):
        async with Console(world.client) as c:
            await c.sign_in(email, tenant=tenant)
            r = await (c.get if route.method == "GET" else c.post)(
                concrete(route, ids), **({} if route.method == "GET" else {"data": {"role": "viewer"}})
            )
            assert r.status_code == 404, (email, r.status_code, r.text[:300])
    assert await b_state(world) == before


# One form that fills every field of the console's forms with values valid for tenant A.
def a_form() -> dict[str, str]:
    return {
        "email": f"iso-{uuid.uuid4().hex[:8]}@example.ch",
        "role": "viewer",
        "name": "Tenant A",
        "scope": "read",
        "billing_name": "Tenant A billing",
        "currency": "CHF",
        "address": "",
        "title": "Tenant A's note",
        "content": "Written by tenant A.",
        "reason": "tenant A asks",
    }


@pytest.mark.parametrize(
    "route", [r for r in TENANT_ROUTES if r.method == "POST" and not r.params], ids=lambda r: r.label
)
async def test_a_form_without_ids_acts_on_the_sessions_tenant_only(world: ApiWorld, route: ConsoleRoute) -> None:
    """Invite, create a key, save settings...: the tenant comes from the session, never from the
    form; B sees nothing new or changed."""
    before = await b_state(world)
    for email, tenant in a_sessions(world):
        async with Console(world.client) as c:
            await c.sign_in(email, tenant=tenant)
            form = {**a_form(), "tenant": world.b.slug, "tenant_id": str(world.b.id)}
            r = await c.post(route.full_path, form)
            # 422: a form this one cannot fill (an upload without its file, an erasure without its
            # slug typed); 404: nothing of A's to act on (no pending erasure request to cancel).
            # Refused as a whole, which must change nothing of B's either.
            assert r.status_code in (201, 303, 403, 404, 422), (email, r.status_code, r.text[:300])
    assert await b_state(world) == before


async def test_switching_to_a_tenant_of_which_one_is_not_a_member_is_refused(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "owner"))
        for tenant in (world.b.slug, str(world.b.id)):
            r = await c.post("/console/tenants", {"tenant": tenant})
            assert r.status_code == 403
        page = await c.get("/console/overview")
        assert "Tenant A" in page.text and "Tenant B" not in page.text


async def test_a_person_of_both_tenants_switches_between_them(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        r = await c.sign_in(both_email(world))
        page = await c.get("/console/overview")
        assert page.status_code == 303 and page.headers["location"] == "/console/tenants"
        page = await c.get("/console/tenants")
        assert world.a.slug in page.text and world.b.slug in page.text
        await c.post("/console/tenants", {"tenant": str(world.a.id)})
        assert "Tenant A" in (await c.get("/console/overview")).text
        r = await c.post("/console/tenants", {"tenant": str(world.b.id)})
        assert r.status_code == 303
        page = await c.get("/console/members")
        assert email_of(world, "b", "viewer") in page.text and email_of(world, "a", "viewer") not in page.text


@pytest.fixture(scope="module")
def cell_urls(server_url: str) -> Any:
    with two_cell_databases(server_url) as urls:
        yield urls


async def test_the_consultant_switches_between_tenants_of_two_cells(cell_urls: dict[str, str]) -> None:
    """A in cell eu (CH), B in cell dz (DZ); the person has an account in each. Switching into the
    other cell starts a session there (the API's select-tenant) and ends the console's previous
    one: the cookie holds one session, and no session is left behind unused."""
    async with two_cell_client(cell_urls) as (client, admin_url, settings):
        w = await build_world(client, admin_url, settings, cell_urls)
        async with Console(client) as c:
            await c.sign_in(both_email(w), tenant=str(w.a.id))
            page = (await c.get("/console/overview")).text
            assert "Tenant A" in page and "cell eu" in page
            in_eu = c.client.cookies.get("iaf_console")
            r = await c.post("/console/tenants", {"tenant": str(w.b.id)})
            assert r.status_code == 303
            page = (await c.get("/console/overview")).text
            assert "Tenant B" in page and "cell dz" in page and "Algeria" in page
            members = (await c.get("/console/members")).text
            assert email_of(w, "b", "viewer") in members and email_of(w, "a", "viewer") not in members
            r = await c.post("/console/tenants", {"tenant": str(w.a.id)})
            assert r.status_code == 303
            assert "Tenant A" in (await c.get("/console/overview")).text
        async with Console(client) as old:
            old.client.cookies.set("iaf_console", in_eu or "", domain="testserver.local", path="/console")
            r = await old.get("/console/overview")
            assert r.status_code == 303 and r.headers["location"].startswith("/console/sign-in")


# --- pages at work -------------------------------------------------------------------------------------


async def test_invite_change_role_resend_revoke_and_remove(world: ApiWorld) -> None:
    email = f"invitee-{uuid.uuid4().hex[:8]}@example.ch"
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        await c.get("/console/members")
        r = await c.post("/console/members/invite", {"email": email, "role": "member"})
        assert r.status_code == 303 and r.headers["location"] == "/console/members?done=invited"
        page = await c.get(r.headers["location"])
        assert email in page.text and 'role="status"' in page.text
        invitation = next(
            i
            for i in (await world.client.get("/api/v1/members/invitations", headers=world.a.auth())).json()
            if i["email"] == email
        )
        r = await c.post(f"/console/invitations/{invitation['id']}/resend")
        assert r.status_code == 303
        r = await c.post("/console/members/invite", {"email": email, "role": "member"})
        assert r.status_code == 409 and "pending invitation" in r.text  # the API's refusal, on the page
        r = await c.post(f"/console/invitations/{invitation['id']}/revoke")
        assert r.status_code == 303
        statuses = {
            i["id"]: i["status"]
            for i in (await world.client.get("/api/v1/members/invitations", headers=world.a.auth())).json()
        }
        assert statuses[invitation["id"]] == "revoked"
        # An admin cannot make an owner (the service's rule), shown on the page.
        viewer = world.a.user_ids["viewer"]
        r = await c.post(f"/console/members/{viewer}/role", {"role": "owner"})
        assert r.status_code == 403
        r = await c.post(f"/console/members/{viewer}/role", {"role": "member"})
        assert r.status_code == 303
        r = await c.post(f"/console/members/{viewer}/role", {"role": "viewer"})
        assert r.status_code == 303
        roles = {
            m["user_id"]: m["role"] for m in (await world.client.get("/api/v1/members", headers=world.a.auth())).json()
        }
        assert roles[viewer] == "viewer"


async def test_create_an_api_key_shown_once_and_revoke_it(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        await c.get("/console/api-keys")
        r = await c.post("/console/api-keys", {"name": "console key", "scope": "write"})
        assert r.status_code == 201
        secret = re.search(r'id="new-key"[^>]*value="([^"]+)"', r.text)
        assert secret and secret.group(1).startswith("iaf_")
        assert (await world.client.get("/api/v1/tenant", headers={"X-API-Key": secret.group(1)})).status_code == 200
        page = await c.get("/console/api-keys")
        assert secret.group(1) not in page.text and "console key" in page.text
        key = next(
            k
            for k in (await world.client.get("/api/v1/api-keys", headers=world.a.auth())).json()
            if k["name"] == "console key"
        )
        r = await c.post(f"/console/api-keys/{key['id']}/revoke")
        assert r.status_code == 303
        assert (await world.client.get("/api/v1/tenant", headers={"X-API-Key": secret.group(1)})).status_code == 401


async def test_an_invalid_key_form_names_the_problem(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        await c.get("/console/api-keys")
        r = await c.post("/console/api-keys", {"name": "", "scope": "read"})
        assert r.status_code == 422 and 'role="alert"' in r.text


async def test_settings_as_owner_and_billing_as_admin(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        page = await c.get("/console/settings")
        assert "tenant-form" not in page.text and "billing-form" in page.text
        r = await c.post(
            "/console/settings/billing",
            {"billing_name": "Cabinet A", "billing_email": "", "address": "Rue 1", "vat_number": "", "currency": "CHF"},
        )
        assert r.status_code == 303
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "owner"))
        await c.get("/console/settings")
        r = await c.post("/console/settings/tenant", {"name": "Tenant A", "admin_email": "not an email"})
        assert r.status_code == 422
        r = await c.post("/console/settings/tenant", {"name": "Tenant A", "admin_phone": "+41 22 000 00 00"})
        assert r.status_code == 303
    tenant = (await world.client.get("/api/v1/tenant", headers=world.a.auth())).json()
    assert tenant["admin_phone"] == "+41 22 000 00 00"
    billing = (await world.client.get("/api/v1/billing-account", headers=world.a.auth())).json()
    assert billing["billing_name"] == "Cabinet A"


async def test_overview_shows_plan_region_cell_credits_and_usage(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        page = (await c.get("/console/overview")).text
        for text in ("Enterprise", "Switzerland", "Where the data lives", 'role="meter"', "<svg"):
            assert text in page, text
        # The largest file allowed (the enterprise plan's max_file_bytes, 50 MiB), in bytes' units.
        assert 'id="bar-max_file_bytes">Largest file (kept / allowed)</span>' in page
        assert "/ 52.4 MB (" in page, page


# --- languages -----------------------------------------------------------------------------------------


async def test_language_from_the_browser_then_from_the_switcher(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        r = await c.get("/console/sign-in", headers={"Accept-Language": "ar-DZ,ar;q=0.9,fr;q=0.5"})
        assert '<html lang="ar" dir="rtl">' in r.text
        r = await c.get("/console/sign-in", headers={"Accept-Language": "de-CH, fr-CH;q=0.8"})
        assert '<html lang="fr" dir="ltr">' in r.text and "Connexion" in r.text
        r = await c.post("/console/language", {"lang": "ar", "next": "/console/sign-in"})
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
        r = await c.get("/console/sign-in", headers={"Accept-Language": "fr"})
        assert '<html lang="ar" dir="rtl">' in r.text


async def test_numbers_and_dates_in_the_users_locale(world: ApiWorld) -> None:
    en, fr, ar = i18n.lang("en"), i18n.lang("fr", "fr-FR,fr;q=0.9"), i18n.lang("ar", "ar-DZ")
    assert en.number(1234567) == "1,234,567"
    assert fr.number(1234567) == "1\u202f234\u202f567" and str(fr.locale) == "fr_FR"
    assert ar.number(1234567) == "1.234.567" and ar.dir == "rtl"
    import datetime as dt

    day = dt.date(2026, 12, 3)
    assert "Dec" in en.date(day) and "déc." in fr.date(day)


async def test_a_next_parameter_never_leaves_the_console(world: ApiWorld) -> None:
    async with Console(world.client) as c:
        await c.get("/console/sign-in")
        r = await c.post(
            "/console/sign-in",
            {"email": email_of(world, "a", "viewer"), "password": PASSWORD, "next": "https://evil.example/"},
        )
        assert r.headers["location"] == "/console/"
        await c.get("/console/overview")
        r = await c.post("/console/language", {"lang": "fr", "next": "//evil.example/console/"})
        assert r.headers["location"] == "/console/"


async def test_the_invitation_link_of_the_email_opens_the_console_page(world: ApiWorld) -> None:
    r = await world.client.get("/accept-invitation?token=inv_x")
    assert r.status_code == 303 and r.headers["location"] == "/console/accept-invitation?token=inv_x"
    async with Console(world.client) as c:
        page = await c.get("/console/accept-invitation?token=inv_x")
        assert page.status_code == 200 and csrf_of(page.text)
        r = await c.post("/console/accept-invitation", {"token": "inv_x", "name": "X", "password": "long enough pass"})
        assert r.status_code == 404 and 'role="alert"' in r.text


async def test_the_verification_and_reset_links_of_the_emails_open_console_pages(world: ApiWorld) -> None:
    """The links of "verify your address", "reset your password" and "you already have an account"
    open console pages; opening one changes nothing (mail scanners fetch links), its button does."""
    email = await register_user(world.client, "linker", region=world.a.region)
    token = verification_token(world.url_of("a"), email)
    r = await world.client.get(f"/verify-email?token={token}")
    assert r.status_code == 303 and r.headers["location"] == f"/console/verify-email?token={token}"
    r = await world.client.get("/sign-in")
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    me = {"Authorization": f"Bearer {await login(world.client, email)}"}
    async with Console(world.client) as c:
        page = await c.get(f"/console/verify-email?token={token}")
        assert page.status_code == 200 and token in page.text
        assert (await world.client.get("/api/v1/me", headers=me)).json()["user"]["email_verified"] is False
        r = await c.post("/console/verify-email", {"token": token})
        assert r.status_code == 200 and 'role="status"' in r.text
        assert (await world.client.get("/api/v1/me", headers=me)).json()["user"]["email_verified"] is True
        r = await c.post("/console/verify-email", {"token": token})  # once only
        assert r.status_code == 410 and 'role="alert"' in r.text

        page = await c.get("/console/reset-password")  # the account-exists email's link: ask for one
        assert page.status_code == 200 and 'name="email"' in page.text
        r = await c.post("/console/reset-password/request", {"email": email})
        assert r.status_code == 200 and 'role="status"' in r.text
        match = re.search(
            r"/reset-password\?token=(pwr_[A-Za-z0-9_-]+)", queued_email(world.url_of("a"), email, "password_reset")
        )
        assert match is not None
        reset = match.group(1)
        r = await world.client.get(f"/reset-password?token={reset}")
        assert r.status_code == 303 and r.headers["location"] == f"/console/reset-password?token={reset}"
        page = await c.get(f"/console/reset-password?token={reset}")
        assert page.status_code == 200 and 'name="new_password"' in page.text
        r = await c.post("/console/reset-password", {"token": reset, "new_password": "1234567890"})
        assert r.status_code == 422 and 'role="alert"' in r.text  # the policy, naming nothing of the account
        r = await c.post("/console/reset-password", {"token": reset, "new_password": "a brand new passphrase"})
        assert r.status_code == 200 and 'role="status"' in r.text
    assert (await world.client.get("/api/v1/me", headers=me)).status_code == 401  # every session ended
    assert await login(world.client, email, "a brand new passphrase")


def invitation_token(world: ApiWorld, email: str) -> str:
    """The token of the newest invitation email queued for `email` (in tenant A's cell)."""
    with psycopg.connect(world.url_of("a")) as conn:
        row = conn.execute(
            "SELECT text_body FROM email_outbox WHERE to_address = %s ORDER BY id DESC LIMIT 1", (email,)
        ).fetchone()
    assert row is not None
    match = re.search(r"/accept-invitation\?token=(inv_[A-Za-z0-9_-]+)", row[0])
    assert match, row[0]
    return match.group(1)


async def test_a_signed_in_account_accepts_an_invitation_as_itself(world: ApiWorld) -> None:
    email = await register_user(world.client, "joiner", region=world.a.region)
    async with Console(world.client) as admin:
        await admin.sign_in(email_of(world, "a", "admin"))
        await admin.get("/console/members")
        assert (await admin.post("/console/members/invite", {"email": email, "role": "viewer"})).status_code == 303
    token = invitation_token(world, email)
    async with Console(world.client) as c:
        await c.sign_in(email)  # no tenant yet
        assert (await c.get("/console/overview")).headers["location"] == "/console/tenants"
        page = await c.get(f"/console/accept-invitation?token={token}")
        assert f"Accept as {email}" in page.text
        r = await c.post("/console/accept-invitation", {"token": token})
        assert r.status_code == 303 and r.headers["location"] == "/console/overview?done=joined"
        page = await c.get(r.headers["location"])
        assert "Tenant A" in page.text and "Viewer" in page.text and 'role="status"' in page.text
        # The link works once.
        r = await c.post("/console/accept-invitation", {"token": token})
        assert r.status_code == 409


async def test_concurrent_requests_with_an_expired_access_token_share_one_refresh(world: ApiWorld) -> None:
    """Two pages loaded at once after the access token expired: one refresh, both answered, and
    the session lives on (a refresh token spent twice would end it)."""
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        access, refresh = (c.client.cookies.get("iaf_console") or "").split("~")
        c.client.cookies.set("iaf_console", f"x{access}~{refresh}", domain="testserver.local", path="/console")
        pages = await asyncio.gather(c.client.get("/console/overview"), c.client.get("/console/members"))
        assert [p.status_code for p in pages] == [200, 200]
        assert pages[0].cookies.get("iaf_console") == pages[1].cookies.get("iaf_console")
        assert (await c.get("/console/api-keys")).status_code == 200


async def test_a_member_removed_meanwhile_is_taken_to_the_tenant_choice(world: ApiWorld) -> None:
    email = await register_user(world.client, "removed", region=world.a.region)
    r = await world.client.post("/api/v1/members", json={"email": email, "role": "viewer"}, headers=world.a.auth())
    assert r.status_code == 201, r.text
    user_id = r.json()["user_id"]
    async with Console(world.client) as c:
        await c.sign_in(email)
        assert "Tenant A" in (await c.get("/console/overview")).text
        r = await world.client.delete(f"/api/v1/members/{user_id}", headers=world.a.auth())
        assert r.status_code == 204
        r = await c.get("/console/overview")
        assert r.status_code == 303 and r.headers["location"] == "/console/tenants"
        page = await c.get("/console/tenants")
        assert page.status_code == 200 and "Tenant A" not in page.text and "Sign out" in page.text
        assert (await c.post("/console/sign-out")).status_code == 303


# --- platform pages (console3) -------------------------------------------------------------------------
# Generated from the route table too: every route declared with @page(platform=True) is refused to
# anyone but a platform administrator (a tenant's owner included), with or without a tenant chosen,
# and refuses a form without its CSRF token even from a platform administrator.

PLATFORM_FORM = {
    "name": "Intruder",
    "region": "CH",
    "plan": "enterprise",
    "status": "suspended",
    "admin_email": "intruder@example.ch",
    "amount": "1000",
    "reason": "intrusion",
    "kind": "grant",
    "idempotency_key": "intruder",
    "max_members": "1",
}


async def platform_state(w: ApiWorld) -> tuple[Any, ...]:
    """What a platform form could change: tenant A as the platform reads it, its credits, and
    every tenant's slug (a created one would show)."""
    h = w.headers(w.platform_token)
    a = (await w.client.get(f"/api/v1/admin/tenants/{w.a.id}", headers=h)).json()
    balance = (await w.client.get("/api/v1/credits/balance", headers=w.a.auth())).json()
    slugs, cursor = [], None
    while True:
        r = await w.client.get(
            "/api/v1/admin/tenants", params={"limit": 100, **({"cursor": cursor} if cursor else {})}, headers=h
        )
        assert r.status_code == 200, r.text
        slugs += [t["slug"] for t in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return a, balance, sorted(slugs)


NOT_PLATFORM = [
    pytest.param(route, who, id=f"{route.label} as {who}")
    for route in PLATFORM_ROUTES
    for who in ("owner", "viewer", "both")
]


@pytest.mark.parametrize(("route", "who"), NOT_PLATFORM)
async def test_a_platform_page_is_refused_to_anyone_but_a_platform_admin(
    world: ApiWorld, route: ConsoleRoute, who: str
) -> None:
    """Tenant A's owner and viewer, and the person of A and B acting for A: 403 on every platform
    page and form action (the database's platform check), nothing changed, and no menu link."""
    email = both_email(world) if who == "both" else email_of(world, "a", who)
    before = await platform_state(world)
    async with Console(world.client) as c:
        await c.sign_in(email, tenant=world.a.slug if who == "both" else None)
        target = concrete(route, {"tenant": world.a.id})
        form = {**PLATFORM_FORM, "slug": f"intruder-{uuid.uuid4().hex[:8]}"}
        r = await (c.get(target) if route.method == "GET" else c.post(target, form))
        assert r.status_code == 403 and "Platform administrators only." in r.text, (r.status_code, r.text[:300])
        assert "/console/platform/" not in (await c.get("/console/overview")).text
    assert await platform_state(world) == before


@pytest.mark.parametrize("route", [r for r in PLATFORM_ROUTES if r.method == "POST"], ids=lambda r: r.label)
async def test_a_platform_form_without_the_csrf_token_is_refused(world: ApiWorld, route: ConsoleRoute) -> None:
    before = await platform_state(world)
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        await c.get("/console/platform/tenants")
        target = concrete(route, {"tenant": world.a.id})
        form = {**PLATFORM_FORM, "slug": f"forged-{uuid.uuid4().hex[:8]}"}
        r = await c.post(target, form, csrf=False)
        assert r.status_code == 403 and "<html" in r.text
        r = await c.post(target, {**form, "csrf": "forged"})
        assert r.status_code == 403
    assert await platform_state(world) == before


@pytest.mark.parametrize("route", [r for r in PLATFORM_ROUTES if r.method == "GET"], ids=lambda r: r.label)
async def test_every_platform_page_opens_for_a_platform_admin(world: ApiWorld, route: ConsoleRoute) -> None:
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        r = await c.get(concrete(route, {"tenant": world.a.id}))
        assert r.status_code == 200 and "<main" in r.text, r.text[:500]
        # The platform section's menu marks the page (or its section) as the current one.
        assert re.search(r'href="/console/platform/[a-z-]+" aria-current="page"', r.text), r.text[:500]


@pytest.mark.parametrize("route", [r for r in PLATFORM_ROUTES if r.params], ids=lambda r: r.label)
async def test_a_tenant_that_does_not_exist_is_404(world: ApiWorld, route: ConsoleRoute) -> None:
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        await c.get("/console/platform/tenants")
        target = concrete(route, {"tenant": uuid.uuid4()})
        form = {**PLATFORM_FORM, "idempotency_key": uuid.uuid4().hex}
        r = await (c.get(target) if route.method == "GET" else c.post(target, form))
        assert r.status_code == 404 and "<html" in r.text


async def create_tenants(w: ApiWorld, tag: str, specs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    out = []
    for i, (region, plan, status) in enumerate(specs):
        body = {
            "name": f"Cabinet {tag} {i}",
            "slug": f"cab-{tag}-{i}",
            "region": region,
            "plan": plan,
            "status": status,
        }
        r = await w.client.post("/api/v1/admin/tenants", json=body, headers=w.headers(w.platform_token))
        assert r.status_code == 201, r.text
        out.append(r.json())
    return out


def slugs_on(page: str) -> list[str]:
    return re.findall(r"<code>([a-z0-9-]+)</code>", page)


async def test_platform_tenants_by_region_plan_status_with_search_and_pages(world: ApiWorld) -> None:
    tag = uuid.uuid4().hex[:6]
    made = await create_tenants(
        world,
        tag,
        [("DZ", "free", "trial"), ("CH", "pro", "active"), ("DZ", "pro", "active"), ("FR", "free", "suspended")],
    )
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        page = (await c.get(f"/console/platform/tenants?q={tag}")).text
        assert slugs_on(page) == [t["slug"] for t in made]
        assert 'class="cell"' in page and "Algeria" in page and "Switzerland" in page
        # Each tenant's cell: one cell here, or dz / eu with IAFACTORY_TEST_CELLS=2.
        cells = re.findall(r'<td class="cell">([^<]+)</td>', page)
        assert len(cells) == 4 and "unknown" not in cells
        page = (await c.get(f"/console/platform/tenants?q={tag.upper()}&region=DZ")).text
        assert slugs_on(page) == [made[0]["slug"], made[2]["slug"]]
        page = (await c.get(f"/console/platform/tenants?q={tag}&plan=pro&status=active")).text
        assert slugs_on(page) == [made[1]["slug"], made[2]["slug"]]
        page = (await c.get(f"/console/platform/tenants?q={tag}&status=cancelled")).text
        assert slugs_on(page) == [] and "No tenant matches." in page
        # Pages of two: the next link keeps the search and the filters.
        shown: list[str] = []
        url: str | None = f"/console/platform/tenants?q={tag}&limit=2"
        while url:
            page = (await c.get(url)).text
            shown += slugs_on(page)
            found = re.search(r'href="(/console/platform/tenants\?[^"]+)" rel="next"', page)
            url = found.group(1).replace("&amp;", "&") if found else None
            if url:
                assert f"q={tag}" in url and "limit=2" in url
        assert shown == [t["slug"] for t in made]
        # Without a search, the API's own pages (limit 2): the first tenants of the registry.
        page = (await c.get("/console/platform/tenants?limit=2")).text
        assert len(slugs_on(page)) == 2 and 'rel="next"' in page
        r = await c.get("/console/platform/tenants?cursor=not-a-cursor")
        assert r.status_code == 422


async def test_platform_creates_a_tenant_whose_owner_gets_the_invitation(
    world: ApiWorld,
    smtp: tuple[Inbox, int],  # noqa: F811
) -> None:
    inbox, port = smtp
    tag = uuid.uuid4().hex[:6]
    owner = f"owner-{tag}@example.ch"
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        await c.get("/console/platform/tenants")
        form = {"name": "Cabinet Lumière", "slug": f"lumiere-{tag}", "region": "CH", "plan": "pro"}
        r = await c.post("/console/platform/tenants", {**form, "slug": "Not A Slug", "admin_email": owner})
        assert r.status_code == 422 and "slug" in r.text and 'role="alert"' in r.text
        assert 'value="Cabinet Lumière"' in r.text  # the form keeps what was typed
        r = await c.post("/console/platform/tenants", {**form, "status": "active", "admin_email": owner})
        assert r.status_code == 303, r.text
        location = r.headers["location"]
        assert location.startswith("/console/platform/tenants/") and location.endswith("?done=platform_created")
        page = (await c.get(location)).text
        assert "Cabinet Lumière" in page and "Its admin has been invited" in page and owner in page
        assert "Switzerland" in page and "cell " in page
        r = await c.post("/console/platform/tenants", {**form, "admin_email": owner})
        assert r.status_code == 409 and "already taken" in r.text
    tenant_id = location.split("/")[-1].split("?")[0]
    async with bootstrap.database(settings_for(world.url_of("a")), world.url_of("a")) as db:
        await sender.drain(db, smtp_mailer(world.url_of("a"), port))
    mail = next(m for rcpts, m in reversed(inbox.received) if owner in rcpts)
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Cabinet Lumière" in text
    token = re.search(r"/accept-invitation\?token=(inv_[A-Za-z0-9_-]+)", text)
    assert token, text
    r = await world.client.post(
        "/api/v1/auth/accept-invitation",
        json={"token": token.group(1), "name": "Owner", "password": "a new password 6"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == tenant_id and r.json()["tenant"]["role"] == "owner"


async def test_platform_changes_plan_status_limits_and_grants_credits(world: ApiWorld) -> None:
    (made,) = await create_tenants(world, uuid.uuid4().hex[:6], [("CH", "free", "trial")])
    base = f"/console/platform/tenants/{made['id']}"
    h = world.headers(world.platform_token)
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        await c.get(base)
        r = await c.post(f"{base}/plan", {"plan": "enterprise", "status": "active"})
        assert r.status_code == 303 and r.headers["location"] == f"{base}?done=platform_updated"
        page = (await c.get(r.headers["location"])).text
        assert "Plan and status saved." in page and "Enterprise" in page
        r = await c.post(f"{base}/plan", {"plan": "gold"})
        assert r.status_code == 422 and "plan" in r.text
        r = await c.post(
            f"{base}/limits",
            {"max_members": "7", "monthly_credits": "500", "max_api_keys": "", "max_file_bytes": "1048576"},
        )
        assert r.status_code == 303
        page = (await c.get(r.headers["location"])).text
        assert 'name="max_members" type="number" min="0" step="1" inputmode="numeric" value="7"' in page
        assert "Largest uploaded file (bytes)" in page
        assert 'name="max_file_bytes" type="number" min="0" step="1" inputmode="numeric" value="1048576"' in page
        r = await c.post(f"{base}/limits", {"max_members": "0"})
        assert r.status_code == 422 and "max_members" in r.text
        r = await c.post(f"{base}/limits", {"max_members": "many"})
        assert r.status_code == 422
        tenant = (await world.client.get(f"/api/v1/admin/tenants/{made['id']}", headers=h)).json()
        assert (tenant["plan"], tenant["status"]) == ("enterprise", "active")
        assert tenant["settings"]["limits"] == {"max_members": 7, "monthly_credits": 500, "max_file_bytes": 1048576}
        # Credits for tenant A: the form carries its own key, so sending it twice grants once.
        before = (await world.client.get("/api/v1/credits/balance", headers=world.a.auth())).json()["balance"]
        page = (await c.get(f"/console/platform/tenants/{world.a.id}")).text
        key = re.search(r'name="idempotency_key" value="([^"]+)"', page)
        assert key
        grant = {"amount": "1234", "reason": "console goodwill", "kind": "grant", "idempotency_key": key.group(1)}
        r = await c.post(f"/console/platform/tenants/{world.a.id}/credits", grant)
        assert r.status_code == 200 and "1,234 credits granted" in r.text
        assert f"Balance: {before + 1234:,}" in r.text
        r = await c.post(f"/console/platform/tenants/{world.a.id}/credits", grant)
        assert r.status_code == 200 and "granted once" in r.text
        r = await c.post(
            f"/console/platform/tenants/{world.a.id}/credits", {**grant, "amount": "0", "idempotency_key": "x"}
        )
        assert r.status_code == 422 and "amount" in r.text
    after = (await world.client.get("/api/v1/credits/balance", headers=world.a.auth())).json()["balance"]
    assert after == before + 1234
    # The tenant's own console shows it.
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        assert f"{after:,}" in (await c.get("/console/overview")).text
    ledger = (await world.client.get("/api/v1/credits", headers=world.a.auth())).json()
    assert any(t.get("reason") == "console goodwill" for t in ledger.get("items", ledger))


async def test_platform_sees_tenants_of_two_cells_with_their_cell(cell_urls: dict[str, str]) -> None:
    """A in cell eu (CH), B in cell dz (DZ): the directory gives the page, each cell its tenants;
    a change of plan on B goes to dz and to the directory (the plan filter finds it)."""
    async with two_cell_client(cell_urls) as (client, admin_url, settings):
        w = await build_world(client, admin_url, settings, cell_urls)
        tag = w.a.slug.rsplit("-", 1)[1]
        async with Console(client) as c:
            await c.sign_in(platform_email(w))
            page = (await c.get(f"/console/platform/tenants?q={tag}")).text
            rows = re.findall(
                r"<code>([a-z0-9-]+)</code></td>\s*<td>[^<]+</td>\s*<td class=\"cell\">([^<]+)</td>", page
            )
            assert sorted(rows) == sorted([(w.a.slug, "eu"), (w.b.slug, "dz")]), rows
            page = (await c.get(f"/console/platform/tenants/{w.b.id}")).text
            assert "cell dz" in page and "Algeria" in page
            r = await c.post(f"/console/platform/tenants/{w.b.id}/plan", {"plan": "free", "status": "active"})
            assert r.status_code == 303, r.text
            page = (await c.get(f"/console/platform/tenants?q={tag}&plan=free")).text
            assert slugs_on(page) == [w.b.slug]
            r = await c.post(
                f"/console/platform/tenants/{w.b.id}/credits",
                {"amount": "10", "reason": "dz", "kind": "grant", "idempotency_key": uuid.uuid4().hex},
            )
            assert r.status_code == 200 and "10 credits granted" in r.text
        async with Console(client) as c:
            await c.sign_in(email_of(w, "b", "owner"))
            r = await c.get("/console/platform/tenants")
            assert r.status_code == 403


# --- knowledge base, usage, credits, audit log, your data (console2) ---------------------------------


async def drain_index(url: str) -> int:
    """Index what is waiting in the database at `url` (with two cells: tenant A's cell), as the
    worker would (driven, never waited for)."""
    from conftest import settings_for
    from iafactory.db import bootstrap
    from iafactory.knowledge import worker
    from iafactory.knowledge.embeddings import embedder

    settings = settings_for(url)
    async with bootstrap.database(settings, url) as db:
        return await worker.drain(db, embedder(settings))


async def test_knowledge_add_a_document_then_find_it_by_search(world: ApiWorld, module_db: str) -> None:
    tag = uuid.uuid4().hex[:8]
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        page = (await c.get("/console/knowledge")).text
        assert 'id="search-form"' in page and "document-form" not in page  # viewers search, members add
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "member"))
        await c.get("/console/knowledge")
        r = await c.post("/console/knowledge", {"title": "", "content": "x"})
        assert r.status_code == 422 and 'role="alert"' in r.text and "title" in r.text
        text = f"Les horaires d'ouverture du cabinet {tag} sont de 8 h à 18 h, du lundi au vendredi."
        r = await c.post(
            "/console/knowledge",
            {"title": f"Horaires {tag}", "content": text, "source": "https://example.ch/horaires", "language": "fr"},
        )
        assert r.status_code == 303 and r.headers["location"] == "/console/knowledge?done=document_added"
        page = (await c.get(r.headers["location"])).text
        assert f"Horaires {tag}" in page and "Waiting" in page and 'role="status"' in page
        assert await drain_index(world.url_of("a")) >= 1
        page = (await c.get("/console/knowledge")).text
        assert "Indexed" in page
        r = await c.get(f"/console/knowledge?q=horaires+{tag}&mode=keyword")
        assert r.status_code == 200
        passages = r.text.split('<ol class="passages">', 1)[1]
        assert f"<strong>Horaires {tag}</strong>" in passages and "passage 1" in passages
        assert "relevance 100%" in passages and "8 h à 18 h" in passages
        r = await c.get(f"/console/knowledge?q=introuvable{tag}&mode=keyword")
        assert "No passage matches." in r.text


async def test_knowledge_upload_a_file_then_find_its_passage(world: ApiWorld, module_db: str) -> None:
    """The upload form is multipart, with the CSRF token among its fields; it runs the API's own
    upload handler (type read from the content, refusals shown on the page)."""
    tag = uuid.uuid4().hex[:8]
    text = f"# Règlement {tag}\n\nLe parking {tag} est réservé aux patients du cabinet.\n"
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "member"))
        page = (await c.get("/console/knowledge")).text
        assert 'enctype="multipart/form-data"' in page and 'id="upload-form"' in page
        files = {"file": (f"reglement-{tag}.md", text.encode(), "text/markdown")}
        r = await c.client.post("/console/knowledge/files", data={"title": f"Règlement {tag}"}, files=files)
        assert r.status_code == 403  # no CSRF token
        r = await c.client.post(
            "/console/knowledge/files", data={"csrf": c.csrf or "", "title": f"Règlement {tag}"}, files=files
        )
        assert r.status_code == 303 and r.headers["location"] == "/console/knowledge?done=file_uploaded", r.text
        r = await c.client.post(
            "/console/knowledge/files",
            data={"csrf": c.csrf or ""},
            files={"file": ("program.exe", b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" * 50, "application/octet-stream")},
        )
        assert r.status_code == 415 and 'role="alert"' in r.text and "file:" in r.text
        r = await c.client.post("/console/knowledge/files", data={"csrf": c.csrf or ""})
        assert r.status_code == 422 and "Choose a file." in r.text
        assert await drain_index(world.url_of("a")) >= 1
        page = (await c.get("/console/knowledge")).text
        link = re.search(rf'href="(/console/knowledge/files/\d+)" download>reglement-{tag}.md</a>', page)
        assert link, page
        r = await c.get(link.group(1))
        assert r.status_code == 200 and r.content == text.encode()
        assert r.headers["content-disposition"].startswith("attachment")
        page = (await c.get(f"/console/knowledge?q=parking+{tag}&mode=keyword")).text
        passages = page.split('<ol class="passages">', 1)[1]
        assert f"<strong>Règlement {tag}</strong>" in passages and "réservé aux patients" in passages
        # The overview's storage bar counts what the plan limit counts: documents' text and files.
        page = (await c.get("/console/overview")).text
        shown = re.search(r'aria-labelledby="bar-max_kb_bytes"[^>]*aria-valuenow="(\d+)"', page)
        with psycopg.connect(world.url_of("a")) as conn:
            counted = conn.execute(
                """SELECT (SELECT coalesce(sum(octet_length(content)), 0) FROM knowledge_base WHERE tenant_id = %s)
                        + (SELECT coalesce(sum(size_bytes), 0) FROM knowledge_files WHERE tenant_id = %s)""",
                (world.a.id, world.a.id),
            ).fetchone()[0]
        assert shown and int(shown.group(1)) == counted and counted >= len(text.encode()), (shown, counted)


async def test_knowledge_upload_over_the_tenants_file_limit_is_refused_on_the_page(world: ApiWorld) -> None:
    """The console's form runs the API's handler: the tenant's max_file_bytes applies, and the
    refusal (the limit in bytes, which limit) is shown."""
    h = world.headers(world.platform_token)
    tenant = (await world.client.get(f"/api/v1/admin/tenants/{world.a.id}", headers=h)).json()
    before = tenant["settings"].get("limits") or {}
    r = await world.client.patch(
        f"/api/v1/admin/tenants/{world.a.id}", json={"limits": {**before, "max_file_bytes": 1000}}, headers=h
    )
    assert r.status_code == 200, r.text
    try:
        async with Console(world.client) as c:
            await c.sign_in(email_of(world, "a", "member"))
            await c.get("/console/knowledge")
            r = await c.client.post(
                "/console/knowledge/files",
                data={"csrf": c.csrf or ""},
                files={"file": ("long-note.txt", b"a long note " * 200, "text/plain")},
            )
            assert r.status_code == 413 and 'role="alert"' in r.text, r.text
            assert "more than the 1000 allowed by the tenant&#39;s max_file_bytes (plan enterprise)" in r.text, r.text
    finally:
        r = await world.client.patch(f"/api/v1/admin/tenants/{world.a.id}", json={"limits": before}, headers=h)
        assert r.status_code == 200, r.text


async def test_usage_by_type_and_by_day_with_a_month_picker(world: ApiWorld) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    events = [
        {"event_type": "voice.minutes", "quantity": 3, "idempotency_key": f"u-{uuid.uuid4().hex}"},
        {"event_type": "voice.minutes", "quantity": 4, "idempotency_key": f"u-{uuid.uuid4().hex}"},
        {"event_type": "llm.tokens", "quantity": 1500, "idempotency_key": f"u-{uuid.uuid4().hex}"},
    ]
    r = await world.client.post("/api/v1/usage-events", json={"events": events}, headers=world.a.auth("member"))
    assert r.status_code == 200, r.text
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        page = (await c.get("/console/usage")).text
        by_type = page.split('id="usage-by-type"', 1)[1].split("</table>", 1)[0]
        assert "<code>voice.minutes</code>" in by_type and "<code>llm.tokens</code>" in by_type
        assert 'class="fill p100"' in by_type  # the largest quantity fills its bar
        assert "<svg" in page and f'value="{now:%Y-%m}"' in page and 'id="usage-by-day"' in page
        page = (await c.get("/console/usage?month=2001-02")).text
        assert "No usage recorded this month." in page and 'value="2001-02"' in page
        assert "month=2001-01" in page and "month=2001-03" in page  # previous and next month
        page = (await c.get("/console/usage?month=not-a-month")).text
        assert f'value="{now:%Y-%m}"' in page


async def test_credits_ledger_shows_the_balance_and_pages(world: ApiWorld) -> None:
    platform = world.headers(world.platform_token)
    tag = uuid.uuid4().hex[:6]
    for i in range(26):
        r = await world.client.post(
            f"/api/v1/admin/tenants/{world.a.id}/credits",
            json={"amount": 10 + i, "reason": f"grant {tag} {i}", "idempotency_key": f"{tag}-{i}"},
            headers=platform,
        )
        assert r.status_code == 200, r.text
    balance = (await world.client.get("/api/v1/credits/balance", headers=world.a.auth())).json()["balance"]
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "viewer"))
        page = (await c.get("/console/credits")).text
        assert f"{balance:,}" in page.split('id="credit-balance"', 1)[1].split("</dd>", 1)[0]
        assert f"grant {tag} 25" in page and "+35" in page and "Grant" in page
        assert f"grant {tag} 0<" not in page  # the oldest is on the next page
        following = re.search(r'href="(/console/credits\?cursor=[^"]+)" rel="next"', page)
        assert following
        page = (await c.get(following.group(1).replace("&amp;", "&"))).text
        assert f"grant {tag} 0<" in page and "First page" in page
        assert (await c.get("/console/credits?cursor=nonsense")).status_code == 200


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted() -> None:
    from iafactory.console.pages.audit import safe_cell

    for formula in ("=1+1", "+41 22", "-2", "@SUM(A1)", "\t=x", "\r=x"):
        assert safe_cell(formula) == "'" + formula
    for plain in ("member.added", "", None, 42, "a=b"):
        assert safe_cell(plain) == ("" if plain is None else str(plain))


async def test_audit_log_filters_pages_and_downloads_csv(world: ApiWorld) -> None:
    import csv
    import io

    name = f'=HYPERLINK("http://evil.example","{uuid.uuid4().hex[:6]}")'
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        await c.get("/console/api-keys")
        r = await c.post("/console/api-keys", {"name": name, "scope": "read"})
        assert r.status_code == 201
        page = (await c.get("/console/audit?action=api_key.created")).text
        rows = page.split('id="audit-events"', 1)[1]
        assert "<code>api_key.created</code>" in rows and "<code>member.added</code>" not in rows
        assert 'value="api_key.created"' in page
        admin_id = world.a.user_ids["admin"]
        page = (await c.get(f"/console/audit?actor={admin_id}&from=2000-01-01&to=2100-01-01")).text
        assert f'<option value="{admin_id}" selected>' in page
        members = (await world.client.get("/api/v1/members", headers=world.a.auth())).json()
        admin_name = next(m["name"] for m in members if m["user_id"] == admin_id)
        assert f"<td>{admin_name}</td>" in page.split('id="audit-events"', 1)[1]  # the member's name, not the login
        page = (await c.get("/console/audit?from=2000-01-01&to=2000-01-02")).text
        assert "No event matches." in page
        link = re.search(r'id="audit-csv" href="([^"]+)"', (await c.get("/console/audit?action=api_key.created")).text)
        assert link and link.group(1) == "/console/audit.csv?action=api_key.created"
        r = await c.get(link.group(1))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"].startswith(f'attachment; filename="audit-{world.a.slug}-')
        table = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
        assert table[0][:3] == ["created_at", "action", "actor"]
        assert table[1:] and {row[1] for row in table[1:]} == {"api_key.created"}
        mine = [row for row in table[1:] if name.replace('"', '\\"') in row[-1]]
        assert mine, table[-3:]
        # Every cell: nothing a spreadsheet would evaluate (the JSON of the details starts with '{').
        assert not [cell for row in table for cell in row if cell[:1] in ("=", "+", "-", "@")]
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "member"))
        assert "/console/audit" not in (await c.get("/console/overview")).text  # no link below admin


async def test_the_export_is_every_row_of_the_tenant_and_imports(
    world: ApiWorld, module_db: str, tmp_path: Any
) -> None:
    """The console's export, read by the application role under row security in the admin's own
    transaction, has every tenant table and exactly the rows the operator counts for the tenant;
    its checksums verify (portability.read_archive, as `tenants import` reads it); it is audited."""
    from iafactory.db.scope import operator_transaction
    from iafactory.tenancy import portability
    from iafactory.tenancy.context import TenantContext

    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "admin"))
        page = (await c.get("/console/data")).text
        assert 'id="export-link"' in page and "erasure-form" not in page  # owners request erasure
        r = await c.get("/console/data/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        assert r.headers["content-disposition"].startswith(f'attachment; filename="{world.a.slug}-export-')
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(r.content)
    manifest, files = portability.read_archive(archive)
    assert manifest["tenant"]["id"] == str(world.a.id) and manifest["exported_by"]["kind"] == "tenant"
    async with operator_transaction(world.url_of("a"), TenantContext(tenant_id=world.a.id)) as tx:
        tables = await portability.tenant_tables(tx)
        counts = await portability.count_rows(tx, world.a.id, tables)
    assert set(manifest["tables"]) == {t.name for t in tables}
    exported = {name: meta["rows"] for name, meta in manifest["tables"].items()}
    # The export's own audit row is written after the rows are read.
    assert {k: v for k, v in exported.items() if k != "audit_events"} == {
        k: v for k, v in counts.items() if k != "audit_events"
    }
    assert exported["audit_events"] == counts["audit_events"] - 1
    assert exported["tenant_users"] >= 4 and exported["api_keys"] >= 1
    assert all(str(world.b.id) not in data.decode() for data in files.values())
    emails = {u["email"] for u in manifest["users"]}
    assert email_of(world, "a", "viewer") in emails and email_of(world, "b", "viewer") not in emails
    log = (await world.client.get("/api/v1/audit-events?action=tenant.exported", headers=world.a.auth())).json()
    assert log["items"] and log["items"][0]["details"]["by"] == "tenant"
    # The API's route gives the same archive (the same function).
    r = await world.client.get("/api/v1/tenant/export", headers=world.a.auth("admin"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert (await world.client.get("/api/v1/tenant/export", headers=world.a.auth("member"))).status_code == 403


async def test_an_erasure_request_that_the_platform_confirms(world: ApiWorld) -> None:
    platform = world.headers(world.platform_token)
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "owner"))
        page = (await c.get("/console/data")).text
        assert 'id="erasure-form"' in page and world.a.slug in page
        r = await c.post("/console/data/erasure", {"reason": "closing the practice", "confirm": "wrong"})
        assert r.status_code == 422 and f"type {world.a.slug}" in r.text
        assert (await world.client.get("/api/v1/tenant/erasure-requests", headers=world.a.auth())).json() == []
        r = await c.post("/console/data/erasure", {"reason": "closing the practice", "confirm": world.a.slug})
        assert r.status_code == 303 and r.headers["location"] == "/console/data?done=erasure_requested"
        page = (await c.get(r.headers["location"])).text
        assert "Waiting for the platform’s confirmation" in page and 'id="cancel-erasure-form"' in page
        # The platform sees it; then the owner cancels, and asks again.
        pending = (await world.client.get("/api/v1/admin/erasure-requests", headers=platform)).json()
        first = next(p for p in pending if p["tenant_id"] == str(world.a.id))
        assert first["slug"] == world.a.slug and first["requested_by_email"] == email_of(world, "a", "owner")
        r = await c.post("/console/data/erasure/cancel")
        assert r.status_code == 303
        r = await world.client.post(f"/api/v1/admin/tenants/{world.a.id}/erasure-request/confirm", headers=platform)
        assert r.status_code == 404  # cancelled: nothing to confirm
        await c.get("/console/data")
        r = await c.post("/console/data/erasure", {"reason": "again", "confirm": world.a.slug})
        assert r.status_code == 303
    # Asking again through the API answers the open request, not a second one.
    again = await world.client.post(
        "/api/v1/tenant/erasure-requests", json={"reason": "twice"}, headers=world.a.auth("owner")
    )
    assert again.status_code == 200 and again.json()["reason"] == "again"
    assert (
        await world.client.post("/api/v1/tenant/erasure-requests", json={}, headers=world.a.auth("admin"))
    ).status_code == 403
    confirm = f"/api/v1/admin/tenants/{world.a.id}/erasure-request/confirm"
    r = await world.client.post(confirm, headers=world.a.auth("owner"))
    assert r.status_code == 403  # a tenant's owner cannot confirm its own request
    r = await world.client.post(confirm, headers=platform)
    assert r.status_code == 200 and r.json() == {"id": again.json()["id"], "status": "confirmed"}
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "a", "owner"))
        page = (await c.get("/console/data")).text
        assert "Confirmed: an operator will erase the data" in page and "cancel-erasure-form" not in page
        r = await c.post("/console/data/erasure/cancel")
        assert r.status_code == 409
    actions = [
        e["action"]
        for e in (await world.client.get("/api/v1/audit-events?limit=100", headers=world.a.auth())).json()["items"]
        if e["action"].startswith("tenant.erasure")
    ]
    assert actions[:4] == [
        "tenant.erasure_confirmed",
        "tenant.erasure_requested",
        "tenant.erasure_cancelled",
        "tenant.erasure_requested",
    ]
    listed = (await world.client.get("/api/v1/admin/erasure-requests?status=confirmed", headers=platform)).json()
    assert [p["status"] for p in listed if p["tenant_id"] == str(world.a.id)] == ["confirmed"]
    assert not [p for p in listed if p["tenant_id"] == str(world.b.id)]


async def test_a_tenant_cannot_confirm_its_own_erasure_request_in_sql(world: ApiWorld, module_db: str) -> None:
    """Below the API: the application role, as the tenant, may record a pending request and cancel
    it, never confirm one (034's trigger); confirming is platform.confirm_erasure_request's."""
    import psycopg

    from conftest import settings_for
    from iafactory.db import bootstrap
    from iafactory.tenancy.context import TenantContext

    r = await world.client.post("/api/v1/tenant/erasure-requests", json={}, headers=world.b.auth("owner"))
    assert r.status_code == 200 and r.json()["status"] == "pending"
    ctx = TenantContext(tenant_id=world.b.id, user_id=world.b.user_ids["owner"])
    async with bootstrap.database(settings_for(world.url_of("b")), world.url_of("b")) as db:
        for statement in (
            "UPDATE erasure_requests SET status = 'confirmed' WHERE tenant_id = %s",
            "INSERT INTO erasure_requests (tenant_id, status) VALUES (%s, 'confirmed')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with db.tenant(ctx) as tx:
                    await tx.execute(statement, (world.b.id,))
        with pytest.raises(psycopg.Error, match="platform administrators only"):  # IA403, as the tenant
            async with db.tenant(ctx) as tx:
                await tx.execute("SELECT * FROM platform.confirm_erasure_request(%s, NULL)", (world.b.id,))
    r = await world.client.post("/api/v1/tenant/erasure-requests/cancel", headers=world.b.auth("owner"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


async def test_the_platform_confirms_an_erasure_request_on_its_page(world: ApiWorld) -> None:
    """B's owner asks in the console; a platform administrator finds the request on the platform's
    page (B's cell too, with IAFACTORY_TEST_CELLS=2), types the slug and confirms it there; the page
    and the API then say confirmed. (Last of the module: B's request stays confirmed.)"""
    platform = world.headers(world.platform_token)
    # B's pending request, if a test above left one, is cancelled first (404: none open).
    r = await world.client.post("/api/v1/tenant/erasure-requests/cancel", headers=world.b.auth("owner"))
    assert r.status_code in (200, 404), r.text
    async with Console(world.client) as c:
        await c.sign_in(email_of(world, "b", "owner"))
        await c.get("/console/data")
        r = await c.post("/console/data/erasure", {"reason": "moving to another provider", "confirm": world.b.slug})
        assert r.status_code == 303, r.text[:300]
    row = f'id="erasure-{world.b.id}"'
    async with Console(world.client) as c:
        await c.sign_in(platform_email(world))
        page = (await c.get("/console/platform/erasure-requests")).text
        assert 'href="/console/platform/erasure-requests" aria-current="page"' in page
        pending = page.split('id="pending-erasures"', 1)[1].split("</table>", 1)[0]
        assert row in pending and world.b.slug in pending and "moving to another provider" in pending
        assert email_of(world, "b", "owner") in pending
        assert "iafactory tenants erase SLUG --confirm SLUG --confirmed-request" in page
        api_cell = next(
            p["cell"]
            for p in (await world.client.get("/api/v1/admin/erasure-requests", headers=platform)).json()
            if p["tenant_id"] == str(world.b.id)
        )
        if api_cell is not None:  # with cells: the cell holding B, as the API says
            assert f'<td class="cell">{api_cell}</td>' in pending
        # The tenant's platform page links to the pending request.
        tenant_page = (await c.get(f"/console/platform/tenants/{world.b.id}")).text
        assert 'id="tenant-erasure"' in tenant_page and f"/console/platform/erasure-requests#erasure-{world.b.id}" in (
            tenant_page
        )
        confirm = f"/console/platform/tenants/{world.b.id}/erasure-request/confirm"
        r = await c.post(confirm, {"confirm": world.a.slug})  # another tenant's slug: refused
        assert r.status_code == 422 and f"type {world.b.slug}" in r.text and row in r.text
        r = await c.post(confirm, {"confirm": world.b.slug})
        assert (
            r.status_code == 303
            and r.headers["location"] == "/console/platform/erasure-requests?done=erasure_confirmed"
        )
        page = (await c.get(r.headers["location"])).text
        assert "Erasure request confirmed." in page and row not in page
        decided = page.split('id="decided-erasures"', 1)[1].split("</table>", 1)[0]
        assert world.b.slug in decided and "Confirmed: an operator will erase the data" in decided
        tenant_page = (await c.get(f"/console/platform/tenants/{world.b.id}")).text
        assert "Confirmed: an operator will erase the data" in tenant_page
        # Confirming again answers the confirmed request; a tenant without an open request: 404.
        await c.get("/console/platform/erasure-requests")
        assert (await c.post(confirm, {"confirm": world.b.slug})).status_code == 303
        made = (await create_tenants(world, uuid.uuid4().hex[:6], [("CH", "free", "trial")]))[0]
        r = await c.post(f"/console/platform/tenants/{made['id']}/erasure-request/confirm", {"confirm": made["slug"]})
        assert r.status_code == 404 and "open erasure request" in r.text
    listed = (await world.client.get("/api/v1/admin/erasure-requests?status=confirmed", headers=platform)).json()
    assert [p["status"] for p in listed if p["tenant_id"] == str(world.b.id)] == ["confirmed"]
    mine = (await world.client.get("/api/v1/tenant/erasure-requests", headers=world.b.auth("owner"))).json()
    assert mine[0]["status"] == "confirmed" and mine[0]["decided_by"] is not None
