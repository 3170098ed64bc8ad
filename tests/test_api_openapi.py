"""What the OpenAPI document and the router promise a client, checked against the app's route table.

* every operation has an explicit, unique, readable operationId (generated clients get method
  names a person would write: login, list_projects, create_api_key);
* the security schemes (Bearer token, X-API-Key) and, per operation, which of them it accepts;
* a 405 lists in `Allow` every method of the path (RFC 9110), not only those of one route;
* the interactive docs load their scripts from the app itself, not from a CDN.

No database is needed: routing, security and the docs answer before any query.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, routing
from fastapi.utils import generate_unique_id
from starlette.routing import Mount

from api_support import (
    READS_ONLY_ROUTES,
    Credential,
    allowed,
    api_operations,
)
from iafactory.app import create_app
from iafactory.config import Settings

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): the OpenAPI document
# and routing, answered before any database access.
pytestmark = [pytest.mark.anyio, pytest.mark.server_independent]

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
READABLE_ID = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
METHOD_SUFFIX = re.compile(r"_(?:get|head|post|put|patch|delete|options)$")


def offline_app() -> FastAPI:
    return create_app(Settings(database_url="postgresql://unused@127.0.0.1:1/unused"))


APP = offline_app()
DOC = APP.openapi()


def route_table(app: FastAPI) -> Iterator[Any]:
    """Every route the app dispatches to, included routers expanded (FastAPI includes them lazily)."""
    expand = getattr(routing, "iter_route_contexts", None)
    yield from (expand(app.routes) if expand is not None else app.routes)


def is_mount(route: Any) -> bool:
    return isinstance(route, Mount) or isinstance(getattr(route, "route", None), Mount)


def api_routes(app: FastAPI) -> list[Any]:
    """The routes that are operations of the OpenAPI document."""
    return [
        r
        for r in route_table(app)
        if not is_mount(r)
        and getattr(r, "include_in_schema", False)
        and getattr(r, "methods", None)
        and hasattr(r, "operation_id")
    ]


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=offline_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


# --- operationId ------------------------------------------------------------------------------------


def test_the_route_table_is_not_empty() -> None:
    """The checks below iterate the route table: they would pass vacuously on an empty one."""
    labels = {f"{m} {r.path}" for r in api_routes(APP) for m in r.methods}
    assert {"POST /api/v1/auth/login", "GET /api/v1/projects", "GET /healthz"} <= labels
    assert len(labels) == sum(len(item) for item in DOC["paths"].values())


@pytest.mark.parametrize("route", api_routes(APP), ids=lambda r: f"{'/'.join(sorted(r.methods))} {r.path}")
def test_every_operation_id_is_explicit_and_readable(route: Any) -> None:
    op_id = route.operation_id
    assert op_id, f"{route.path}: no operation_id= on the route; FastAPI would make up {generate_unique_id(route)!r}"
    assert op_id != generate_unique_id(route), f"{op_id!r} is FastAPI's generated id"
    assert READABLE_ID.fullmatch(op_id), f"{op_id!r}: use lower_snake_case words"
    assert "api_v1" not in op_id and not METHOD_SUFFIX.search(op_id), f"{op_id!r} spells the URL or the method"


def test_operation_ids_are_unique_and_are_the_documents() -> None:
    ids = [r.operation_id for r in api_routes(APP)]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    documented = [op["operationId"] for item in DOC["paths"].values() for op in item.values()]
    assert sorted(documented) == sorted(ids)


def test_the_ids_a_person_would_write() -> None:
    ids = {op["operationId"] for item in DOC["paths"].values() for op in item.values()}
    assert {
        "login",
        "register",
        "select_tenant",
        "get_me",
        "create_api_key",
        "list_api_keys",
        "revoke_api_key",
        "list_projects",
        "create_project",
        "get_project",
        "update_project",
        "delete_project",
        "create_lead",
        "list_pme_analyses",
        "admin_list_tenants",
        "check_health",
    } <= ids


# --- security schemes --------------------------------------------------------------------------------


def test_the_document_declares_the_two_credentials() -> None:
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http" and schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["bearerAuth"]["bearerFormat"] == "JWT"
    assert schemes["apiKeyAuth"] == {**schemes["apiKeyAuth"], "type": "apiKey", "in": "header", "name": "X-API-Key"}


KEYS = [
    Credential("read key", {}, "viewer", uuid.uuid4(), api_key=True, read_only=True),
    Credential("write key", {}, "member", uuid.uuid4(), api_key=True),
]
OPERATIONS = api_operations(DOC)  # also fills READS_ONLY_ROUTES from the document
BOTH = [{"bearerAuth": []}, {"apiKeyAuth": []}]
BEARER = [{"bearerAuth": []}]
# The operations that act for no tenant, by what they take.
NO_TENANT = {
    "POST /api/v1/auth/register": None,
    "POST /api/v1/auth/login": None,
    "GET /healthz": None,
    "GET /readyz": None,
    "POST /api/v1/auth/select-tenant": BEARER,  # a user's token: an API key has no tenants to choose from
    "GET /api/v1/me": BOTH,  # whoever the credential names
    # A new person accepts with a name and a password; an existing account with its user token.
    "POST /api/v1/auth/accept-invitation": [{"bearerAuth": []}, {}],
    "POST /api/v1/auth/refresh": None,  # the refresh token is in the body
    # A password reset: an email, then the token of the link; no credential.
    "POST /api/v1/auth/password-reset": None,
    "POST /api/v1/auth/password-reset/confirm": None,
    # Email verification: the token of the link, no credential; asking for a new link, a user's token.
    "POST /api/v1/auth/verify-email": None,
    "POST /api/v1/auth/verify-email/resend": BEARER,
    # A person's own sessions and password: a user's token (an API key has no session or password).
    "POST /api/v1/auth/logout": BEARER,
    "POST /api/v1/auth/logout-all": BEARER,
    "GET /api/v1/me/sessions": BEARER,
    "DELETE /api/v1/me/sessions/{session_id}": BEARER,
    "POST /api/v1/me/password": BEARER,
    "POST /api/v1/tenants": BEARER,  # a person creates a tenant of their own: an API key belongs to one already
}


def expected_security(method: str, path: str) -> list[dict[str, list[str]]] | None:
    """Tenant operations that some API key may call (per the role tables of tests/api_support.py,
    which test_api_roles checks against real answers) accept both credentials; the others, the
    platform's included, only a user's token."""
    label = f"{method} {path}"
    if label in NO_TENANT:
        return NO_TENANT[label]
    return BOTH if any(allowed(k, method, path) for k in KEYS) else BEARER


@pytest.mark.parametrize("op", OPERATIONS, ids=[op.label for op in OPERATIONS])
async def test_each_operation_declares_the_credentials_it_accepts(client: httpx.AsyncClient, op: Any) -> None:
    declared = DOC["paths"][op.path][op.method.lower()].get("security")
    assert declared == expected_security(op.method, op.path), (op.label, READS_ONLY_ROUTES)
    # And the code agrees: with no credential, exactly the operations that declare one answer 401.
    path = re.sub(r"\{[^}]+\}", "1", op.path)
    r = await client.request(op.method, path, json={} if op.method in ("POST", "PUT", "PATCH") else None)
    optional = not declared or {} in declared
    assert (r.status_code == 401) == (not optional), (op.label, r.status_code, r.text)


# --- 405 and Allow ----------------------------------------------------------------------------------


def methods_by_template(app: FastAPI) -> dict[str, tuple[Any, set[str]]]:
    table: dict[str, tuple[Any, set[str]]] = {}
    for r in route_table(app):
        if not is_mount(r) and getattr(r, "methods", None):
            table.setdefault(r.path, (r.path_regex, set()))[1].update(r.methods)
    return table


TEMPLATES = methods_by_template(APP)


def concrete(path: str) -> str:
    # The console's routes use Starlette convertors ({user_id:int}); the API's take any segment.
    path = re.sub(r"\{[^}:]+:int\}", "1", path)
    return re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000001", path)


def methods_of(url: str) -> set[str]:
    """The methods of the URL's path in the document: those of the matching template with the fewest
    parameters (/knowledge-base/search also matches /knowledge-base/{item_id} to the router)."""
    matching = [(path.count("{"), methods) for path, (regex, methods) in TEMPLATES.items() if regex.match(url)]
    fewest = min(n for n, _ in matching)
    return set().union(*(methods for n, methods in matching if n == fewest))


@pytest.mark.parametrize("path", sorted(TEMPLATES))
async def test_a_405_lists_every_method_of_the_path(client: httpx.AsyncClient, path: str) -> None:
    url = concrete(path)
    supported = methods_of(url)
    # Other routes may take a method at this URL (GET /knowledge-base/search is a GET of the
    # document with id "search", refused by the id's validation): only methods no route takes.
    unsupported = [
        m for m in HTTP_METHODS if m not in set().union(*(ms for rx, ms in TEMPLATES.values() if rx.match(url)))
    ]
    assert unsupported
    for method in unsupported:
        r = await client.request(method, url)
        assert r.status_code == 405, (method, path, r.status_code)
        assert r.headers["content-type"] == "application/problem+json"
        allow = {m.strip() for m in r.headers["allow"].split(",")}
        assert allow == supported, f"{method} {path}: Allow: {r.headers['allow']}, the path takes {sorted(supported)}"


async def test_allow_names_the_methods_of_every_route_of_a_path(client: httpx.AsyncClient) -> None:
    """The case the issue found: GET and POST are two routes of /admin/tenants."""
    r = await client.put("/api/v1/admin/tenants")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = await client.put(concrete("/api/v1/projects/{item_id}"))
    assert r.status_code == 405 and r.headers["allow"] == "GET, PATCH, DELETE"
    r = await client.put("/api/v1/knowledge-base/search")
    assert r.status_code == 405 and r.headers["allow"] == "POST", "the document's methods of the path"


async def test_the_docs_assets_answer_405_with_allow_too(client: httpx.AsyncClient) -> None:
    r = await client.post("/static-offline-docs/swagger-ui.css")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


# --- the docs pages need no CDN ---------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_pages_load_every_asset_from_the_app(client: httpx.AsyncClient, page: str) -> None:
    r = await client.get(page)
    assert r.status_code == 200
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", r.text)
    assert urls, r.text
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere"
        asset = await client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert "fonts.googleapis" not in r.text and "cdn." not in r.text
