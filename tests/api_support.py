"""Fixtures and helpers for HTTP tests: the real app on a real, migrated database.

`api_world` gives two tenants (A and B), each with an owner, an admin, a member and a viewer,
tokens for each, and a read and a write API key per tenant; plus a user who belongs to both and a
platform administrator. Everything is created through the public API or the operator path, the
way a customer would end up with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from conftest import _create_database, _drop_database, create_migrated_database, settings_for
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.cells import directory
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

PASSWORD = "correct-horse-battery"
ROLES = ("owner", "admin", "member", "viewer")


def fast_settings(admin_url: str, **overrides: Any) -> Settings:
    """Real argon2id, with test-sized cost (the production defaults take ~50 ms per hash)."""
    return settings_for(admin_url, argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1, **overrides)


@dataclass
class TenantFixture:
    id: uuid.UUID
    slug: str
    tokens: dict[str, str] = field(default_factory=dict)  # role -> JWT for that tenant
    region: str = "CH"
    user_ids: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # "read" / "write" -> API key

    def auth(self, role: str = "owner") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def key(self, scope: str = "write", header: str = "x-api-key") -> dict[str, str]:
        if header == "bearer":
            return {"Authorization": f"Bearer {self.keys[scope]}"}
        return {"X-API-Key": self.keys[scope]}


@dataclass
class ApiWorld:
    client: httpx.AsyncClient
    admin_url: str
    settings: Settings
    a: TenantFixture
    b: TenantFixture
    both_user_token: str  # member of A (admin) and B (member), no tenant selected
    platform_token: str
    # With two cells: the admin URL of the cell holding each tenant ("a", "b") and of the directory.
    cell_urls: dict[str, str] = field(default_factory=dict)

    def url_of(self, tenant: str) -> str:
        """The admin URL of the database holding tenant "a" or "b"."""
        return self.cell_urls.get(tenant, self.admin_url)

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD, tenant: str | None = None) -> str:
    r = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    if tenant is not None:
        r = await client.post(
            "/api/v1/auth/select-tenant", json={"tenant": tenant}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
    return token


async def build_world(
    client: httpx.AsyncClient, admin_url: str, settings: Settings, cells: dict[str, str] | None = None
) -> ApiWorld:
    """`cells` (two cells: {"directory", "dz", "eu"} admin URLs): A lives in eu (CH), B in dz (DZ);
    the user of both has an account in each cell, and so has the platform administrator."""
    if cells is not None:
        return await _build_two_cell_world(client, cells, settings)
    tag = uuid.uuid4().hex[:6]
    pw_hash = await hash_password(settings, PASSWORD)
    tenants: dict[str, TenantFixture] = {}
    async with operator_transaction(admin_url) as tx:
        for name in ("a", "b"):
            slug = f"tenant-{name}-{tag}"
            t = await service.create_tenant(
                tx, TenantCreate(name=f"Tenant {name.upper()}", slug=slug, region="CH", plan="pro", status="active")
            )
            tenants[name] = TenantFixture(id=t.id, slug=slug)
            # Billable actions (PME analyses, transcriptions) need credits.
            await tx.fetch("SELECT * FROM platform.grant_credits(%s, 100000, 'test credits', 'seed')", (t.id,))
            for role in ROLES:
                row = await service.add_member(
                    tx, slug, f"{role}-{name}-{tag}@example.ch", role, name=f"{role} {name}", password_hash=pw_hash
                )
                tenants[name].user_ids[role] = row["user_id"]
        both = f"both-{tag}@example.ch"
        await service.add_member(tx, tenants["a"].slug, both, "admin", name="Both", password_hash=pw_hash)
        await service.add_member(tx, tenants["b"].slug, both, "member", name="Both", password_hash=pw_hash)
        platform = f"platform-{tag}@example.ch"
        await tx.fetchval("SELECT app.register_user(%s, 'Platform', %s)", (platform, pw_hash))
        await service.set_platform_admin(tx, platform, True)
    return await _finish_world(client, admin_url, settings, tenants, tag, both, platform)


async def _finish_world(
    client: httpx.AsyncClient,
    admin_url: str,
    settings: Settings,
    tenants: dict[str, TenantFixture],
    tag: str,
    both: str,
    platform: str,
    cell_urls: dict[str, str] | None = None,
) -> ApiWorld:
    for name, t in tenants.items():
        for role in ROLES:
            t.tokens[role] = await login(client, f"{role}-{name}-{tag}@example.ch")
        for scope in ("read", "write"):
            r = await client.post(
                "/api/v1/api-keys", json={"name": f"{scope} key", "scope": scope}, headers=t.auth("admin")
            )
            assert r.status_code == 201, r.text
            t.keys[scope] = r.json()["key"]
    return ApiWorld(
        client,
        admin_url,
        settings,
        tenants["a"],
        tenants["b"],
        both_user_token=await login(client, both),
        platform_token=await login(client, platform),
        cell_urls=cell_urls or {},
    )


TWO_CELLS = {"dz": ["DZ"], "eu": ["CH", "FR", "BE", "CA"]}


def cells_json(urls: dict[str, str]) -> str:
    return json.dumps({name: {"url": urls[name], "regions": regions} for name, regions in TWO_CELLS.items()})


def prepare_two_cells(urls: dict[str, str]) -> None:
    """Migrate the directory and both cells as `iafactory migrate` does with IAFACTORY_CELLS."""
    from iafactory.cells import service as cell_service
    from iafactory.cells.config import cells, directory_cell

    settings = settings_for(urls["directory"], cells=cells_json(urls))
    for cell in [directory_cell(), *cells(settings).values()]:
        url = cell_service.admin_url(settings, cell)
        asyncio.run(migrate_and_prepare(url, cell.settings(settings), cell=cell))
    # Integer ids are unique per tenant (keys scoped by tenant), so two cells may both hand out
    # project 1. The generated matrices tell A's records from B's by id: start dz's far apart.
    with psycopg.connect(urls["dz"], autocommit=True) as conn:
        for (seq,) in conn.execute(
            "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences WHERE schemaname = 'public'"
        ).fetchall():
            conn.execute("SELECT setval(%s::regclass, 1000000)", (seq,))


async def place_tenant(urls: dict[str, str], cell: str, data: TenantCreate) -> Any:
    """A tenant created as `iafactory tenants create` does with cells: directory, then its cell."""
    tenant_id = uuid.uuid4()
    async with operator_transaction(urls["directory"]) as dtx:
        await directory.record_tenant(
            dtx, directory.Route(tenant_id, data.slug, data.region, cell, data.plan, data.status)
        )
    async with operator_transaction(urls[cell]) as tx:
        return await service.create_tenant(tx, data, tenant_id=tenant_id)


async def place_member(
    urls: dict[str, str], settings: Settings, cell: str, slug: str, email: str, role: str, pw_hash: str
) -> int:
    async with operator_transaction(urls["directory"]) as dtx:
        await directory.record_login(dtx, settings, email, cell)
    async with operator_transaction(urls[cell]) as tx:
        row = await service.add_member(tx, slug, email, role, name=email.split("@")[0], password_hash=pw_hash)
        await tx.fetch("SELECT * FROM platform.grant_credits(%s, 100000, 'test credits', 'seed')", (row["tenant_id"],))
    return row["user_id"]


async def _build_two_cell_world(client: httpx.AsyncClient, urls: dict[str, str], settings: Settings) -> ApiWorld:
    tag = uuid.uuid4().hex[:6]
    pw_hash = await hash_password(settings, PASSWORD)
    tenants: dict[str, TenantFixture] = {}
    homes = {"a": ("eu", "CH"), "b": ("dz", "DZ")}
    for name, (cell, region) in homes.items():
        slug = f"tenant-{name}-{tag}"
        data = TenantCreate(name=f"Tenant {name.upper()}", slug=slug, region=region, plan="pro", status="active")
        t = await place_tenant(urls, cell, data)
        tenants[name] = TenantFixture(id=t.id, slug=slug, region=region)
        for role in ROLES:
            email = f"{role}-{name}-{tag}@example.ch"
            tenants[name].user_ids[role] = await place_member(urls, settings, cell, slug, email, role, pw_hash)
    both = f"both-{tag}@example.ch"
    await place_member(urls, settings, "eu", tenants["a"].slug, both, "admin", pw_hash)
    await place_member(urls, settings, "dz", tenants["b"].slug, both, "member", pw_hash)
    platform = f"platform-{tag}@example.ch"
    for cell in TWO_CELLS:
        async with operator_transaction(urls["directory"]) as dtx:
            await directory.record_login(dtx, settings, platform, cell)
        async with operator_transaction(urls[cell]) as tx:
            await tx.fetchval("SELECT app.register_user(%s, 'Platform', %s)", (platform, pw_hash))
            await service.set_platform_admin(tx, platform, True)
    cell_urls = {"a": urls["eu"], "b": urls["dz"], **urls}
    return await _finish_world(client, urls["directory"], settings, tenants, tag, both, platform, cell_urls)


@asynccontextmanager
async def two_cell_client(urls: dict[str, str]) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    """The real app, in process, serving two cells through the directory (one pool per cell)."""
    from iafactory.app import cell_pools

    settings = fast_settings(urls["directory"], cells=cells_json(urls))
    pools = cell_pools(settings)
    await pools.open()
    try:
        app = create_app(settings, cells=pools)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield client, urls["directory"], settings
        finally:
            app.state.load.close()
    finally:
        await pools.close()


def two_cells_requested() -> bool:
    """IAFACTORY_TEST_CELLS=2: the module-scoped world (the generated matrices) runs on two cells."""
    return os.environ.get("IAFACTORY_TEST_CELLS", "") == "2"


@asynccontextmanager
async def app_client(admin_url: str, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    """The real app, in process, on the database behind `admin_url` (the app role's own pool)."""
    settings = fast_settings(admin_url, **overrides)
    db = bootstrap.database(settings, admin_url)
    async with db:
        app = create_app(settings, db)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield client, admin_url, settings
        finally:
            app.state.load.close()  # the hashing and embedding threads (no lifespan runs here)


@pytest.fixture
async def api_client(migrated_db: str) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    async with app_client(migrated_db) as client:
        yield client


@pytest.fixture
async def api_world(api_client: tuple[httpx.AsyncClient, str, Settings]) -> ApiWorld:
    client, admin_url, settings = api_client
    return await build_world(client, admin_url, settings)


@pytest.fixture(scope="module")
def module_db(server_url: str, migrated_template: str) -> Any:
    """A migrated database shared by one test module (for read-mostly matrices). With
    IAFACTORY_TEST_CELLS=2, the directory's, and `module_cells` holds the two cells."""
    name, admin = create_migrated_database(server_url, migrated_template)
    yield admin
    _drop_database(server_url, name)


@pytest.fixture(scope="module")
def module_cells(request: pytest.FixtureRequest, server_url: str) -> Any:
    """Two cells and a directory (admin URLs by name) for a module, when IAFACTORY_TEST_CELLS=2 and
    the module says it runs on cells (`RUNS_ON_TWO_CELLS = True`: the generated isolation and role
    matrices, which only talk HTTP); else None. Other modules reach into the one database directly."""
    if not two_cells_requested() or not getattr(request.module, "RUNS_ON_TWO_CELLS", False):
        yield None
        return
    with two_cell_databases(server_url) as urls:
        yield urls


@contextmanager
def two_cell_databases(server_url: str) -> Iterator[dict[str, str]]:
    """A directory and the two cells (admin URLs by name), migrated; dropped afterwards."""
    made = {name: _create_database(server_url) for name in ("directory", *TWO_CELLS)}
    urls = {name: url for name, (_, url) in made.items()}
    try:
        prepare_two_cells(urls)
        yield urls
    finally:
        for db_name, _ in made.values():
            _drop_database(server_url, db_name)


def count_rows(admin_url: str, table: str, tenant_id: uuid.UUID | None = None) -> int:
    with psycopg.connect(admin_url) as conn:
        if tenant_id is None:
            return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        return conn.execute(f'SELECT count(*) FROM "{table}" WHERE tenant_id = %s', (tenant_id,)).fetchone()[0]


# --- The route table, read from the app's OpenAPI document ----------------------------------------
# Shared by the generated matrices (test_api_isolation_matrix, test_api_roles): a route added to the
# app is enumerated here without anyone editing a test. FastAPI wraps included routers lazily, so the
# OpenAPI document, not `app.routes`, is the reliable list.

import re as _re  # noqa: E402
from collections.abc import Callable  # noqa: E402

API_PREFIX = "/api/v1"
ID_PARAM = _re.compile(r"^(?:id|[a-z0-9_]+_id)$")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ROLE_RANKS = {role: rank for rank, role in enumerate(("viewer", "member", "admin", "owner"))}


def body_of(r: httpx.Response) -> Any:
    """A response's JSON; for a binary one (a file downloaded), its type and digest, which is what
    the matrices compare (the bytes themselves are checked in tests/test_knowledge_files.py)."""
    if "json" in r.headers.get("content-type", "") or not r.content:
        return r.json() if r.content else None
    return {"content-type": r.headers.get("content-type"), "sha256": hashlib.sha256(r.content).hexdigest()}


def offline_openapi() -> dict[str, Any]:
    """The OpenAPI document of a freshly built app. Building it opens no connection, so test modules
    can enumerate routes at collection time."""
    return create_app(Settings(database_url="postgresql://unused@127.0.0.1:1/unused")).openapi()


def resolve_schema(doc: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """Follow `$ref`s (one level at a time, as often as needed)."""
    while schema is not None and "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


@dataclass(frozen=True)
class ApiOperation:
    method: str
    path: str
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]
    body: dict[str, Any] | None  # the JSON request body's schema, `$ref` resolved
    responses: tuple[str, ...]
    required_query: tuple[tuple[str, str], ...] = ()  # (name, sample value) of required query parameters
    # A POST that only reads (marked `x-reads-only` in the document, e.g. a search).
    reads_only: bool = False
    form: dict[str, Any] | None = None  # a multipart/form-data body's schema (a file upload), `$ref` resolved

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def is_write(self) -> bool:
        return self.method in WRITE_METHODS and not self.reads_only

    @property
    def kind(self) -> str | None:
        """'by_id': one `{..._id}` path parameter naming a record (GET/PATCH/DELETE /projects/{item_id},
        or an action on it such as POST /admin/tenants/{tenant_id}/credits); 'collection': no path
        parameter; None: a shape the generated matrices do not know how to drive."""
        if not self.path_params:
            return "collection"
        if len(self.path_params) == 1 and ID_PARAM.match(self.path_params[0]):
            return "by_id"
        return None

    @property
    def collection(self) -> str:
        """/api/v1/projects for /api/v1/projects/{item_id} (and for /api/v1/projects/{item_id}/run);
        itself for a collection route."""
        return self.path.split("/{", 1)[0] if self.kind == "by_id" else self.path

    @property
    def is_action(self) -> bool:
        """A route below a record (/admin/tenants/{tenant_id}/credits), not the record itself."""
        return self.kind == "by_id" and not self.path.endswith("}")

    def at(self, ident: Any) -> str:
        """The path with the record's id filled in."""
        return self.path.replace("{" + self.path_params[0] + "}", str(ident)) if self.path_params else self.path

    @property
    def id_param(self) -> str | None:
        return self.path_params[0] if self.kind == "by_id" else None


def api_operations(doc: dict[str, Any]) -> list[ApiOperation]:
    """Every operation of the document (not only /api/v1), in document order."""
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "patch", "delete", "head", "options", "trace"):
                continue
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            content = (op.get("requestBody") or {}).get("content", {})
            body = content.get("application/json", {}).get("schema")
            form = content.get("multipart/form-data", {}).get("schema")
            ops.append(
                ApiOperation(
                    method=method.upper(),
                    path=path,
                    path_params=tuple(p["name"] for p in params if p["in"] == "path"),
                    query_params=tuple(p["name"] for p in params if p["in"] == "query"),
                    body=resolve_schema(doc, body),
                    responses=tuple(op.get("responses", {})),
                    required_query=required_query_values(params),
                    reads_only=bool(op.get("x-reads-only")),
                    form=resolve_schema(doc, form),
                )
            )
            if op.get("x-reads-only"):
                READS_ONLY_ROUTES.add((method.upper(), path))
    return ops


# (METHOD, path) of the POST routes that only read: read API keys may call them.
READS_ONLY_ROUTES: set[tuple[str, str]] = set()


def required_query_values(params: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """Sample values for required query parameters, from their schema: enums take their first
    value; date-times open the widest window (the first one 2000, later ones 2100), so that a
    from/to pair is valid; numbers take their minimum."""
    values = []
    datetimes = 0
    for p in params:
        if p["in"] != "query" or not p.get("required"):
            continue
        schema = p.get("schema", {})
        if schema.get("enum"):
            values.append((p["name"], str(schema["enum"][0])))
        elif schema.get("format") == "date-time":
            values.append((p["name"], "2000-01-01T00:00:00Z" if datetimes == 0 else "2100-01-01T00:00:00Z"))
            datetimes += 1
        elif schema.get("type") in ("integer", "number"):
            values.append((p["name"], str(schema.get("minimum", 1))))
        else:
            raise LookupError(f"no sample for required query parameter {p['name']} ({schema})")
    return tuple(values)


# --- Who may call what -----------------------------------------------------------------------------


def resource_prefixes() -> list[str]:
    """The tenant-owned record types registered in iafactory.domains (their CRUD routes)."""
    from iafactory.domains import RESOURCES

    return [f"{API_PREFIX}/{spec.name}" for spec in RESOURCES]


def write_role_table() -> dict[str, str | None]:
    """Minimum role to call a WRITE route, by path prefix (the longest matching prefix wins).
    'platform' = a platform administrator's token; None = no role (the sign-in steps). A write
    route that matches no entry is a route nobody has decided about: the role tests fail on it."""
    return {
        f"{API_PREFIX}/auth": None,  # register, login, select-tenant, refresh, logout: before any tenant role
        f"{API_PREFIX}/me": None,  # the caller's own sessions and password, with or without a tenant
        f"{API_PREFIX}/tenants": None,  # self-service: any signed-in user creates a tenant of their own
        f"{API_PREFIX}/admin": "platform",  # tenant registry: platform administrators only
        f"{API_PREFIX}/members": "admin",
        f"{API_PREFIX}/api-keys": "admin",
        f"{API_PREFIX}/tenant": "owner",  # the caller's own tenant (name, contact, settings)
        f"{API_PREFIX}/billing-account": "admin",  # the billing contact
        f"{API_PREFIX}/usage-events": "member",  # metering, like any record a member writes
        **dict.fromkeys(resource_prefixes(), "member"),
        f"{API_PREFIX}/knowledge-base/search": "viewer",  # a POST that only reads
    }


def read_role_table() -> dict[str, str | None]:
    """Minimum role to call a READ route, by path prefix."""
    return {
        f"{API_PREFIX}/me": None,  # any valid credential, with or without a tenant
        f"{API_PREFIX}/admin": "platform",
        f"{API_PREFIX}/members": "viewer",
        f"{API_PREFIX}/members/invitations": "admin",  # who is invited (their emails): admins only
        f"{API_PREFIX}/api-keys": "viewer",
        f"{API_PREFIX}/tenant": "viewer",
        f"{API_PREFIX}/billing-account": "viewer",
        f"{API_PREFIX}/credits": "viewer",
        f"{API_PREFIX}/usage-events": "viewer",
        f"{API_PREFIX}/usage/summary": "viewer",
        f"{API_PREFIX}/audit-events": "admin",  # who did what: admins only
        f"{API_PREFIX}/tenant/export": "admin",  # every record of the tenant, the audit log among them
        f"{API_PREFIX}/tenant/erasure-requests": "admin",
        **dict.fromkeys(resource_prefixes(), "viewer"),
    }


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def required_role(method: str, path: str) -> str | None:
    """The minimum role for `method path`; LookupError if no table entry covers it."""
    table = write_role_table() if method.upper() in WRITE_METHODS else read_role_table()
    matches = [prefix for prefix in table if _under(path, prefix)]
    if not matches:
        raise LookupError(
            f"{method} {path}: no entry in the role table of tests/api_support.py "
            f"(write_role_table / read_role_table) says which role may call it"
        )
    return table[max(matches, key=len)]


@dataclass(frozen=True)
class Credential:
    label: str
    headers: dict[str, str]
    role: str | None = None  # the tenant role it acts with (API keys: read → viewer, write → member)
    tenant_id: uuid.UUID | None = None
    api_key: bool = False
    read_only: bool = False  # a read-scope API key
    platform: bool = False  # a platform administrator's token


def tenant_credentials(t: TenantFixture) -> list[Credential]:
    """Every credential of a tenant: each role's JWT, and both API keys through both headers."""
    creds = [Credential(f"{role} JWT", t.auth(role), role, t.id) for role in ROLES]
    for scope in ("read", "write"):
        for header in ("bearer", "x-api-key"):
            creds.append(
                Credential(
                    f"{scope} key ({'Authorization: Bearer' if header == 'bearer' else 'X-API-Key'})",
                    t.key(scope, header),
                    "viewer" if scope == "read" else "member",
                    t.id,
                    api_key=True,
                    read_only=scope == "read",
                )
            )
    return creds


# Routes with no tenant role that still need a person's token: an API key (which acts for its
# tenant, not for a person) is refused with 403.
USER_TOKEN_ONLY = frozenset({("POST", f"{API_PREFIX}/tenants")})


def allowed(cred: Credential, method: str, path: str) -> bool:
    """Whether the credential may call the route at all (else 403), per the role tables."""
    need = required_role(method, path)
    if need is None:
        return not (cred.api_key and (method.upper(), path) in USER_TOKEN_ONLY)
    if need == "platform":
        return cred.platform and not cred.api_key
    if cred.tenant_id is None or cred.role is None:
        return False
    if cred.read_only and method.upper() in WRITE_METHODS and (method.upper(), path) not in READS_ONLY_ROUTES:
        return False
    return ROLE_RANKS[cred.role] >= ROLE_RANKS[need]


# --- Request bodies generated from the schema ---------------------------------------------------------


class UnresolvedReference(LookupError):
    pass


# Values a schema cannot express: fields whose valid value depends on the state of the system.
REGISTERED_EMAIL = object()  # an account that exists and belongs to no tenant yet
SEEDER_REGION = object()  # the region of the seeder's tenant (where its people have accounts)
BODY_OVERRIDES: dict[str, dict[str, Any]] = {
    # Adding a member takes the email of a registered user; "viewer" because only owners may grant
    # "owner" (the schema's first enum value), which test_api_auth checks on its own.
    f"{API_PREFIX}/members": {"email": REGISTERED_EMAIL, "role": "viewer"},
    # Inviting: any new address; "viewer" for the same reason (only owners invite owners).
    f"{API_PREFIX}/members/invitations": {"role": "viewer"},
    # A tenant of one's own lives in the cell of its region, where the caller needs an account: the
    # region of the seeder's tenant, whose people are the callers.
    f"{API_PREFIX}/tenants": {"region": SEEDER_REGION},
}

_PATTERN_CANDIDATES = ("fr", "en", "de", "fr-CH", "a", "abc", "x1", "slug-1", "A", "1", "0", "2030-01-01", "#336699")


class BodyBuilder:
    """A valid instance of a JSON schema (the OpenAPI dialect FastAPI writes).

    Strings carry `marker`, so a test can tell whose data a response shows. `reference(name)`
    supplies the id for a `<noun>_id` field (or raises UnresolvedReference). `full=True` fills every
    property (for updates); otherwise only the required ones."""

    def __init__(self, doc: dict[str, Any], marker: str, reference: Callable[[str], Any] | None = None) -> None:
        self.doc, self.marker, self.reference = doc, marker, reference
        self.counter = 0

    def _n(self) -> int:
        self.counter += 1
        return self.counter

    def build(self, schema: dict[str, Any] | None, *, full: bool = False, where: str = "body") -> Any:
        schema = resolve_schema(self.doc, schema) or {}
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return schema["enum"][0]
        if (
            "default" in schema
            and schema.get("type") is None
            and not any(k in schema for k in ("anyOf", "oneOf", "allOf"))
        ):
            return schema["default"]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [resolve_schema(self.doc, o) for o in schema[key]]
                options = [o for o in options if o.get("type") != "null"] or options
                return self.build(options[0], full=full, where=where)
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(resolve_schema(self.doc, part) or {})
            return self.build(merged, full=full, where=where)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or "properties" in schema:
            return self._object(schema, full, where)
        if kind == "array":
            return [
                self.build(schema.get("items"), full=full, where=f"{where}[]") for _ in range(schema.get("minItems", 0))
            ]
        if kind == "string":
            return self._string(schema, where)
        if kind in ("integer", "number"):
            low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1 if "exclusiveMinimum" in schema else 1)
            high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
            value = max(low, 1) if high is None or max(low, 1) <= high else low
            return int(value) if kind == "integer" else float(value)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        raise AssertionError(
            f"{where}: cannot build a value for schema {schema!r}; teach BodyBuilder (tests/api_support.py)"
        )

    def _object(self, schema: dict[str, Any], full: bool, where: str) -> dict[str, Any]:
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        for name, prop in schema.get("properties", {}).items():
            if not (full or name in required):
                continue
            if name.endswith("_id") and self.reference is not None:
                try:
                    out[name] = self.reference(name)
                except UnresolvedReference:
                    if name in required:
                        raise
                continue
            out[name] = self.build(prop, full=full, where=f"{where}.{name}")
        return out

    def _string(self, schema: dict[str, Any], where: str) -> str:
        fmt = schema.get("format")
        n = self._n()
        if fmt == "email":
            return f"{self.marker}-{n}@example.ch"
        if fmt == "date-time":
            return "2030-01-01T00:00:00Z"
        if fmt == "date":
            return "2030-01-01"
        if fmt == "time":
            return "12:00:00Z"
        if fmt == "uuid":
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.marker}/{n}"))
        if fmt in ("uri", "url"):
            return f"https://example.ch/{self.marker}/{n}"
        low, high = schema.get("minLength", 0), schema.get("maxLength", 10_000)
        if "pattern" in schema:
            pattern = _re.compile(schema["pattern"])
            field_name = where.rsplit(".", 1)[-1].replace("_", "-")
            for candidate in (f"{self.marker}-{field_name}-{n}", *_PATTERN_CANDIDATES):
                if pattern.search(candidate) and low <= len(candidate) <= high:
                    return candidate
            raise AssertionError(
                f"{where}: no known value matches pattern {schema['pattern']!r}; "
                f"add one to _PATTERN_CANDIDATES in tests/api_support.py"
            )
        value = f"{self.marker}-{where.rsplit('.', 1)[-1].replace('_', '-')}-{n}"
        if len(value) < low:
            value += "x" * (low - len(value))
        return value[:high]


async def register_user(client: httpx.AsyncClient, marker: str, region: str | None = None) -> str:
    """A new account (belonging to no tenant, its address not verified yet): its email. `region`: in
    the cell serving it. Registration answers 202 whether or not the email had an account."""
    email = f"{marker}-{uuid.uuid4().hex[:8]}@example.ch"
    body = {"email": email, "password": PASSWORD, "name": marker, **({"region": region} if region else {})}
    r = await client.post("/api/v1/auth/register", json=body)
    assert r.status_code == 202, r.text
    return email


_VERIFY_TOKEN = _re.compile(r"/verify-email\?token=(eml_[A-Za-z0-9_-]+)")


def queued_email(admin_url: str, email: str, kind: str) -> str:
    """The text of the newest email of `kind` queued to `email` in the outbox of the database behind
    `admin_url` (read as its owner: the application sees the outbox only through its functions)."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "SELECT text_body FROM email_outbox WHERE to_address = %s AND kind = %s ORDER BY id DESC LIMIT 1",
            (email, kind),
        ).fetchone()
    assert row is not None, f"no {kind} email queued to {email}"
    return row[0]


def verification_token(admin_url: str, email: str) -> str:
    """The token of the newest "verify your address" email queued to `email`."""
    match = _VERIFY_TOKEN.search(queued_email(admin_url, email, "verify_email"))
    assert match is not None
    return match.group(1)


async def verified_user(client: httpx.AsyncClient, admin_url: str, marker: str, region: str | None = None) -> str:
    """register_user, then the link of its verification email opened: an account that may create a
    tenant. `admin_url`: the database (the cell) where the account lives."""
    email = await register_user(client, marker, region)
    r = await client.post("/api/v1/auth/verify-email", json={"token": verification_token(admin_url, email)})
    assert r.status_code == 204, r.text
    return email


async def apply_overrides(
    client: httpx.AsyncClient, collection: str, body: Any, marker: str, region: str | None = None
) -> Any:
    """BODY_OVERRIDES for fields the schema cannot describe (e.g. "a registered email")."""
    overrides = BODY_OVERRIDES.get(collection)
    if not overrides or not isinstance(body, dict):
        return body
    out = dict(body)
    for name, value in overrides.items():
        if name not in body and value is REGISTERED_EMAIL:
            continue  # e.g. PATCH /members/{id} takes no email
        if value is REGISTERED_EMAIL:
            value = await register_user(client, marker, region)
        elif value is SEEDER_REGION:
            value = region or "CH"
        out[name] = value
    return out


# --- Creating records from the route table ----------------------------------------------------------


def tenant_writable_collections(doc: dict[str, Any]) -> dict[str, ApiOperation]:
    """Collection routes a tenant writes to (POST create, or PATCH/PUT of a per-tenant singleton such
    as /tenant), keyed by collection path; the platform's and the sign-in routes excluded."""
    out: dict[str, ApiOperation] = {}
    for op in api_operations(doc):
        if (
            op.path.startswith(API_PREFIX)
            and op.kind == "collection"
            and op.method in ("POST", "PATCH", "PUT")
            and required_role(op.method, op.path) in ROLE_RANKS
        ):
            out.setdefault(op.path, op)
    return out


def id_field(doc: dict[str, Any], collection: str) -> str:
    """The field of a record that its by-id routes take: the path parameter's name when records carry
    it (members: user_id), else "id"."""
    for op in api_operations(doc):
        if op.kind == "by_id" and not op.is_action and op.collection == collection:
            return op.id_param or "id"
    return "id"


def record_id(doc: dict[str, Any], collection: str, record: Any) -> Any:
    if not isinstance(record, dict):
        return None
    name = id_field(doc, collection)
    return record.get(name, record.get("id"))


def reference_fields(doc: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, bool]:
    """`<noun>_id` properties of a body schema (nested objects and arrays included) -> required?"""
    found: dict[str, bool] = {}

    def walk(s: dict[str, Any] | None, required: bool) -> None:
        s = resolve_schema(doc, s) or {}
        for key in ("anyOf", "oneOf", "allOf"):
            for option in s.get(key, []):
                walk(option, required)
        if "items" in s:
            walk(s["items"], required and s.get("minItems", 0) > 0)
        needed = set(s.get("required", []))
        for name, prop in s.get("properties", {}).items():
            if name.endswith("_id"):
                found[name] = found.get(name, False) or (required and name in needed)
            else:
                walk(prop, required and name in needed)

    walk(schema, True)
    return found


def referenced_collection(doc: dict[str, Any], field_name: str) -> str | None:
    """The tenant collection a `<noun>_id` field points into: lead_id -> /api/v1/crm/leads, matched on
    the collection's last path segment (plural forms accepted). None when no collection matches."""
    noun = field_name.removesuffix("_id").replace("-", "_")
    forms = {noun, f"{noun}s", f"{noun}es", f"{noun[:-1]}ies" if noun.endswith("y") else noun}
    matches = [
        c
        for c, op in tenant_writable_collections(doc).items()
        if op.method == "POST" and c.rsplit("/", 1)[-1].replace("-", "_") in forms
    ]
    if len(matches) > 1:
        raise UnresolvedReference(f"{field_name} is ambiguous: it could point into any of {matches}")
    return matches[0] if matches else None


class Seeder:
    """Creates records for one tenant through its collections' own create routes, with bodies built
    from the OpenAPI schema; records that a body references (`lead_id` ...) are created first."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        doc: dict[str, Any],
        marker: str,
        headers: dict[str, str],
        region: str | None = None,
    ) -> None:
        self.client, self.doc, self.marker, self.headers = client, doc, marker, headers
        self.region = region  # the tenant's: people it registers live in the cell serving it
        self.ids: dict[str, list[Any]] = {}  # collection -> ids created, oldest first
        self.builder = BodyBuilder(doc, marker, self._reference)

    def _reference(self, field_name: str) -> Any:
        target = referenced_collection(self.doc, field_name)
        if target is None or not self.ids.get(target):
            raise UnresolvedReference(field_name)
        return self.ids[target][-1]

    async def _ensure_references(self, op: ApiOperation, seen: tuple[str, ...] = ()) -> None:
        for name, required in reference_fields(self.doc, op.body).items():
            target = referenced_collection(self.doc, name)
            if target is None:
                if required:
                    raise UnresolvedReference(
                        f"{op.label}: required field {name!r} looks like a reference to a "
                        f"{name.removesuffix('_id')!r}, but no collection under {API_PREFIX} creates one. Teach "
                        f"referenced_collection() in tests/api_support.py where such records come from."
                    )
                continue
            if target in seen:
                raise UnresolvedReference(f"{op.label}: circular references {' -> '.join((*seen, target))}")
            if not self.ids.get(target):
                await self.create(target, seen=(*seen, op.path))

    async def body(self, op: ApiOperation, *, full: bool = True) -> Any:
        await self._ensure_references(op)
        body = self.builder.build(op.body, full=full) if op.body is not None else None
        return await apply_overrides(self.client, op.collection, body, self.marker, self.region)

    async def write(
        self,
        op: ApiOperation,
        path: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        expect_success: bool = True,
    ) -> httpx.Response:
        """Send `op` with a generated body: every property first; only the required ones if the
        app refuses that (422), since optional fields may have rules a schema cannot express."""
        headers = headers or self.headers
        if op.form is not None:
            return await self._upload(op, path, headers, expect_success)
        r = await self.client.request(op.method, path or op.path, json=await self.body(op, full=True), headers=headers)
        if r.status_code == 422:
            first = r.text
            r = await self.client.request(
                op.method, path or op.path, json=await self.body(op, full=False), headers=headers
            )
            if expect_success and r.status_code >= 300:
                raise AssertionError(
                    f"{op.label}: the body generated from the schema was refused, with every "
                    f"field: {first}\nwith the required fields only: {r.status_code} {r.text}"
                )
        if expect_success and r.status_code >= 300:
            raise AssertionError(f"{op.label} as {self.marker}: {r.status_code} {r.text}")
        return r

    async def _upload(
        self, op: ApiOperation, path: str | None, headers: dict[str, str], expect_success: bool
    ) -> httpx.Response:
        """A multipart body: a small text file (carrying the marker, in its name and content) for
        each file field, the marker in the other string fields it requires."""
        assert op.form is not None
        files, data = {}, {}
        for name, prop in op.form.get("properties", {}).items():
            if prop.get("format") == "binary" or "contentMediaType" in prop:
                n = self.builder._n()
                files[name] = (f"{self.marker}-{n}.txt", f"{self.marker} text {n}".encode(), "text/plain")
            elif name in op.form.get("required", []):
                data[name] = self.builder.build(prop, where=f"body.{name}")
        r = await self.client.request(op.method, path or op.path, files=files, data=data, headers=headers)
        if expect_success and r.status_code >= 300:
            raise AssertionError(f"{op.label} as {self.marker}: {r.status_code} {r.text}")
        return r

    async def create(
        self, collection: str, *, headers: dict[str, str] | None = None, seen: tuple[str, ...] = ()
    ) -> Any:
        op = tenant_writable_collections(self.doc).get(collection) or next(
            (
                o
                for o in api_operations(self.doc)
                if o.kind == "collection" and o.method == "POST" and o.path == collection
            ),
            None,
        )
        if op is None or op.method != "POST":
            raise UnresolvedReference(f"nothing creates records in {collection}")
        await self._ensure_references(op, seen)
        r = await self.write(op, headers=headers)
        ident = record_id(self.doc, collection, r.json() if r.content else None)
        if ident is not None:
            self.ids.setdefault(collection, []).append(ident)
        return ident


async def provision_for_load(admin_url: str, world: ApiWorld) -> None:
    """Lift the plan limits off the two tenants (enterprise plan: request rates, members, API keys)
    and grant this month's credits, so that generated matrices are not cut short by a quota."""
    for name, t in (("a", world.a), ("b", world.b)):
        async with operator_transaction(world.url_of(name) if world.cell_urls else admin_url) as tx:
            await service.update_tenant(tx, t.id, plan="enterprise")
            if await tx.fetchval("SELECT to_regprocedure('platform.grant_monthly(date)') IS NOT NULL"):
                await tx.execute("SELECT * FROM platform.grant_monthly()")


# --- A world shared by one test module (read-mostly matrices) -----------------------------------------


@pytest.fixture(scope="module")
async def module_api_client(
    module_db: str, module_cells: dict[str, str] | None
) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    if module_cells is not None:
        async with two_cell_client(module_cells) as client:
            yield client
        return
    async with app_client(module_db) as client:
        yield client


@pytest.fixture(scope="module")
async def module_api_world(
    module_api_client: tuple[httpx.AsyncClient, str, Settings], module_cells: dict[str, str] | None
) -> ApiWorld:
    client, admin_url, settings = module_api_client
    return await build_world(client, admin_url, settings, module_cells)
