"""Tenant isolation over HTTP, generated from the app's route table.

Every operation comes from `app.openapi()`; nothing here names a resource. Tenants A and B each
create records in every collection they can write (bodies built from the request schemas). Then,
with every credential of A (each role's JWT, the read and the write API key through both headers,
and a user who also belongs to B but selected A):

* every by-id route called with B's ids answers 404 (403 when that credential may not call the
  route at all), never 2xx, and shows nothing of B;
* every collection read shows A's rows and no B id, B string or B record, on every page;
* every collection write lands in A: nothing new or changed is visible to B;
* a body that references one of B's records (`project_id`, `lead_id` ...) is refused;
* select-tenant into B is refused.

B's records, as B itself reads them, stay exactly as they were once seeded (checked after every
test that writes). A route the
generator cannot classify fails `test_every_operation_is_covered` unless it is listed, with its
reason, in NON_TENANT_ROUTES.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api_support import (
    API_PREFIX,
    ApiOperation,
    ApiWorld,
    Credential,
    Seeder,
    allowed,
    api_operations,
    body_of,
    id_field,
    offline_openapi,
    provision_for_load,
    reference_fields,
    referenced_collection,
    required_role,
    tenant_credentials,
    tenant_writable_collections,
)

pytestmark = pytest.mark.anyio

# With IAFACTORY_TEST_CELLS=2 (CI's PostgreSQL 15 pass) the world lives in two region cells.
RUNS_ON_TWO_CELLS = True
DOC = offline_openapi()
OPERATIONS = api_operations(DOC)

# Routes with no tenant data behind them: nothing to isolate. Each says why it is safe to leave out.
NON_TENANT_ROUTES = {
    "GET /healthz": "liveness of the process: no credential, no data",
    "GET /readyz": "liveness of the database: no credential, no data",
    "POST /api/v1/auth/register": "creates an account, which belongs to no tenant until an admin adds it; the same "
    "answer for any address (test_registration)",
    # Email verification names a person (a token, or the caller's own accounts), never a tenant.
    "POST /api/v1/auth/verify-email": "a token names one account, in its cell; unknown, used and expired tokens "
    "are refused (test_registration)",
    "POST /api/v1/auth/verify-email/resend": "the caller's own accounts, by the user ids of its token "
    "(test_registration)",
    "POST /api/v1/auth/login": "checks a password before any tenant is chosen; it lists only the caller's own "
    "memberships (test_api_auth)",
    # A person's own sessions and password: keyed by the caller's user id in the database functions
    # (app.user_id), never by a tenant; test_sessions.py shows that another person's session can be
    # neither listed nor revoked (404). Calling them with the matrix's tokens would end its sessions.
    "POST /api/v1/auth/refresh": "spends a refresh token, which names its session and no tenant (test_sessions)",
    "POST /api/v1/auth/logout": "ends the caller's own session (test_sessions)",
    "POST /api/v1/auth/logout-all": "ends the caller's own sessions (test_sessions)",
    "GET /api/v1/me/sessions": "the caller's own sessions (test_sessions)",
    "DELETE /api/v1/me/sessions/{session_id}": "ends one of the caller's own sessions; another's is 404 (test_sessions)",
    "POST /api/v1/me/password": "the caller's own password (test_sessions)",
    # A password reset names a person (an email, then a token), never a tenant: no credential is read.
    "POST /api/v1/auth/password-reset": "queues a reset email to an account's address; the same answer for any "
    "address (test_password_reset)",
    "POST /api/v1/auth/password-reset/confirm": "a token names one account, in its cell; unknown, used and "
    "expired tokens are refused (test_password_reset)",
    # FastAPI's documentation routes are outside the OpenAPI document; listed so that nobody wonders.
    "GET /docs": "Swagger UI (static)",
    "GET /docs/oauth2-redirect": "Swagger UI (static)",
    "GET /redoc": "ReDoc (static)",
    "GET /openapi.json": "the document itself (static)",
}
# Exercised by a dedicated test below rather than by a generated one.
DEDICATED = {
    "POST /api/v1/auth/select-tenant": "test_select_tenant_into_b_is_refused",
    "POST /api/v1/knowledge-base/search": "tests/test_knowledge.py (search isolation, every filter)",
    "POST /api/v1/auth/accept-invitation": "tests/test_invitations.py (the token names its tenant: "
    "test_an_invitation_of_a_never_joins_b)",
    "GET /api/v1/tenant/export": "tests/test_console.py (test_the_export_is_every_row_of_the_tenant_and_imports: "
    "A's archive holds no row of B); each call records itself in the caller's audit log, so it cannot be read "
    "into B's before/after snapshots",
}


def _tenant_op(op: ApiOperation) -> bool:
    return op.label not in NON_TENANT_ROUTES and op.label not in DEDICATED and op.path.startswith(API_PREFIX)


BY_ID = [op for op in OPERATIONS if _tenant_op(op) and op.kind == "by_id"]
READS = [op for op in OPERATIONS if _tenant_op(op) and op.kind == "collection" and op.method == "GET"]
WRITES = [
    op
    for op in OPERATIONS
    if _tenant_op(op) and op.kind == "collection" and op.method in ("POST", "PATCH", "PUT") and not op.reads_only
]


def _role(op: ApiOperation) -> str | None:
    try:
        return required_role(op.method, op.path)
    except LookupError:
        return "unknown"  # reported by test_every_operation_is_covered


REFERENCING = [
    op
    for op in OPERATIONS
    if _tenant_op(op)
    and op.method in ("POST", "PATCH", "PUT")
    and op.kind in ("collection", "by_id")
    and reference_fields(DOC, op.body)
    and _role(op) not in (None, "platform", "unknown")
]

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
EMAIL_TEXT = re.compile(r"^[^@\s]+@[^@\s]+$")


def ids(ops: list[ApiOperation]) -> list[str]:
    return [op.label for op in ops]


def row_id(row: dict[str, Any], name: str) -> Any:
    return row.get(name, row.get("id"))


# --- the world ---------------------------------------------------------------------------------------


@dataclass
class Matrix:
    world: ApiWorld
    markers: dict[str, str]
    seeders: dict[str, Seeder]
    creds: list[Credential]
    b_baseline: dict[str, Any] = field(default_factory=dict)  # B, as B sees itself once seeded
    b_secrets: set[str] = field(default_factory=set)  # strings only B may see
    both_user_knows: set[str] = field(default_factory=set)  # ... that the user in both tenants may see too

    @property
    def client(self) -> httpx.AsyncClient:
        return self.world.client

    async def b_snapshot(self) -> dict[str, Any]:
        """Everything B can read about itself, as B's owner reads it (and B's registry entry, as the
        platform reads it)."""
        b, c = self.world.b, self.client
        snap: dict[str, Any] = {}
        for op in READS:
            if required_role("GET", op.path) == "platform":
                continue
            snap[op.path] = await read_all(c, op, b.auth("owner"), page_size=100)
        for op in OPERATIONS:
            if (
                op.kind == "by_id"
                and not op.is_action
                and op.method == "GET"
                and required_role("GET", op.path) != "platform"
            ):
                for ident in self.b_ids(op):
                    r = await c.get(op.at(ident), headers=b.auth("owner"))
                    snap[f"{op.path} {ident}"] = (r.status_code, stable(body_of(r)))
        r = await c.get(f"{API_PREFIX}/admin/tenants/{b.id}", headers=self.world.headers(self.world.platform_token))
        snap["registry"] = (r.status_code, r.json())
        return snap

    def b_ids(self, op: ApiOperation) -> list[Any]:
        """B's ids for a by-id route: those B's own listing shows (less any A shows too: a user in
        both tenants), the records B created, or B's tenant id for a tenant-id route."""
        assert op.id_param is not None
        found = list(self.seeders["b"].ids.get(op.collection, []))
        listing = next((o for o in READS if o.path == op.collection), None)
        if listing is not None and required_role("GET", listing.path) != "platform":
            name = id_field(DOC, op.collection)
            found += [row_id(row, name) for row in self._b_rows.get(op.collection, [])]
            shared = {row_id(row, name) for row in self._a_rows.get(op.collection, [])}
            found = [i for i in found if i is not None and i not in shared]
        elif op.id_param == "tenant_id":
            found.append(str(self.world.b.id))
        found = list(dict.fromkeys(found))
        if not found:
            raise AssertionError(
                f"{op.label}: cannot find any of B's ids to try: B created none through "
                f"{op.collection} and cannot list it. Teach Matrix.b_ids where they come from."
            )
        return found

    _a_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _b_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def rows_of(body: Any) -> list[dict[str, Any]]:
    """The records of a listing: a JSON array, a page's items, or a single record."""
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        return [r for r in body["items"] if isinstance(r, dict)]
    return [body] if isinstance(body, dict) else []


def stable(body: Any) -> Any:
    """A response body without what differs per request (problem documents carry a request_id)."""
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k != "request_id"}
    return body


async def read_all(c: httpx.AsyncClient, op: ApiOperation, headers: dict[str, str], page_size: int = 1) -> Any:
    """A collection read: every page (with page_size=1, every cursor gets used)."""
    if "limit" not in op.query_params or "cursor" not in op.query_params:
        r = await c.get(op.path, params=dict(op.required_query), headers=headers)
        return (r.status_code, stable(r.json()))
    pages: list[tuple[int, Any]] = []
    params: dict[str, Any] = {**dict(op.required_query), "limit": page_size}
    for _ in range(500):
        r = await c.get(op.path, params=params, headers=headers)
        pages.append((r.status_code, stable(r.json())))
        if r.status_code != 200 or not r.json().get("next_cursor"):
            return pages
        params = {**dict(op.required_query), "limit": page_size, "cursor": r.json()["next_cursor"]}
    raise AssertionError(f"{op.label}: more than 500 pages")


def strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(strings(v) for v in value)) if value else set()
    return set()


def distinctive(s: str, marker: str) -> bool:
    return bool(marker in s or UUID_TEXT.fullmatch(s) or EMAIL_TEXT.match(s) or s.startswith("iaf_"))


@pytest.fixture(scope="module")
async def matrix(module_api_world: ApiWorld) -> Matrix:
    w = module_api_world
    await provision_for_load(w.admin_url, w)
    tag = uuid.uuid4().hex[:10]
    markers = {"a": f"a{tag}", "b": f"b{tag}"}
    seeders = {
        name: Seeder(w.client, DOC, markers[name], t.auth("owner"), t.region) for name, t in (("a", w.a), ("b", w.b))
    }
    for name in ("a", "b"):
        for path, op in tenant_writable_collections(DOC).items():
            if op.method == "POST":
                if not seeders[name].ids.get(path):
                    await seeders[name].create(path)
            else:
                await seeders[name].write(op)  # a singleton (the tenant, its billing account ...)
    r = await w.client.post(
        f"{API_PREFIX}/auth/select-tenant", json={"tenant": str(w.a.id)}, headers=w.headers(w.both_user_token)
    )
    assert r.status_code == 200, r.text
    both = Credential("user of A and B, A selected (admin)", w.headers(r.json()["access_token"]), "admin", w.a.id)
    m = Matrix(w, markers, seeders, [*tenant_credentials(w.a), both])
    a_strings: set[str] = set()
    for op in READS:
        if required_role("GET", op.path) == "platform":
            continue
        for who, rows in (("a", m._a_rows), ("b", m._b_rows)):
            t = w.a if who == "a" else w.b
            listing = await read_all(w.client, op, t.auth("owner"))
            pages = listing if isinstance(listing, list) else [listing]
            rows[op.path] = [row for status, body in pages if status == 200 for row in rows_of(body)]
            if who == "a":
                a_strings |= strings(rows[op.path])
    m.b_baseline = await m.b_snapshot()
    b_strings = strings(m._b_rows) | strings(m.b_baseline)
    m.b_secrets = {s for s in b_strings if distinctive(s, markers["b"])} - a_strings
    m.b_secrets |= {w.b.slug, str(w.b.id)}
    registry = (await w.client.get(f"{API_PREFIX}/admin/tenants/{w.b.id}", headers=w.headers(w.platform_token))).json()
    m.both_user_knows = {w.b.slug, str(w.b.id), registry["name"]}
    assert any(markers["b"] in s for s in m.b_secrets), "B's records carry no marker: the leak checks would be blind"
    return m


def leaks(m: Matrix, cred: Credential, body: str, *, asked_for: Any = None) -> list[str]:
    """B's strings found in a response body (the id that was asked for aside: errors may echo it)."""
    if asked_for is not None:
        body = body.replace(str(asked_for), "")
    known = m.both_user_knows if cred.label.startswith("user of A and B") else set()
    # What the user of both tenants may see of B (GET /me lists their memberships) is no leak, nor
    # is a marker inside it (B's name carries B's marker).
    for s in sorted(known, key=len, reverse=True):
        body = body.replace(s, "")
    return sorted(s for s in m.b_secrets - known if s in body)


def is_problem(r: httpx.Response) -> bool:
    return r.headers.get("content-type", "").startswith("application/problem+json")


# --- the meta-test -------------------------------------------------------------------------------------


def test_every_operation_is_covered() -> None:
    """Every operation of the OpenAPI document is driven by a generated test below, or listed as
    non-tenant with its reason. A route of a shape the generator does not know fails here."""
    covered = {op.label for op in BY_ID + READS + WRITES} | set(DEDICATED)
    unclassified = [
        f"{op.label} (path parameters {list(op.path_params)})"
        for op in OPERATIONS
        if op.label not in covered and op.label not in NON_TENANT_ROUTES
    ]
    assert not unclassified, (
        "operations the isolation matrix does not exercise: "
        + "; ".join(unclassified)
        + ". Give them a shape it knows (a single `{..._id}` path parameter, or GET/POST/PATCH/PUT on a "
        "collection), or list them in NON_TENANT_ROUTES with the reason."
    )
    unknown_role = []
    for op in BY_ID + READS + WRITES:
        try:
            required_role(op.method, op.path)
        except LookupError as err:
            unknown_role.append(str(err))
    assert not unknown_role, unknown_role
    # The generator is not vacuous: it found the routes every tenant API has.
    assert {
        f"GET {API_PREFIX}/members",
        f"DELETE {API_PREFIX}/members/{{user_id}}",
        f"DELETE {API_PREFIX}/api-keys/{{key_id}}",
        f"GET {API_PREFIX}/admin/tenants/{{tenant_id}}",
    } <= covered
    assert any(op.method == "POST" for op in WRITES) and len(BY_ID) >= 5


# --- generated tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", BY_ID, ids=ids(BY_ID))
async def test_by_id_route_refuses_b_ids(matrix: Matrix, op: ApiOperation) -> None:
    m, c = matrix, matrix.client
    targets = m.b_ids(op)
    body_seeder = m.seeders["a"]  # a body that is valid for A: only the tenant can make it fail
    failures = []
    for cred in m.creds:
        expected = 404 if allowed(cred, op.method, op.path) else 403
        for ident in targets:
            body = await body_seeder.body(op) if op.body is not None else None
            r = await c.request(op.method, op.at(ident), json=body, headers=cred.headers)
            where = f"{cred.label} → {op.method} {ident}"
            if r.status_code != expected:
                failures.append(f"{where}: {r.status_code} (expected {expected}) {r.text[:300]}")
            elif not is_problem(r):
                failures.append(f"{where}: content-type {r.headers.get('content-type')}")
            if found := leaks(m, cred, r.text, asked_for=ident):
                failures.append(f"{where}: B's data in the body: {found}")
    assert not failures, "\n".join(failures)
    if op.is_write:  # (a read cannot change B: skipping it saves time)
        assert await m.b_snapshot() == m.b_baseline, "B's records changed"
    if op.method == "GET" and not op.is_action and m.seeders["a"].ids.get(op.collection):
        # Control: the route does answer for A's own record, so the 404s above are about the tenant.
        own = m.seeders["a"].ids[op.collection][0]
        r = await c.get(op.at(own), headers=m.world.a.auth("viewer"))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("op", READS, ids=ids(READS))
async def test_collection_read_shows_only_own_rows(matrix: Matrix, op: ApiOperation) -> None:
    m = matrix
    name = id_field(DOC, op.path)
    b_ids = {row_id(row, name) for row in m._b_rows.get(op.path, [])} - {None}
    b_ids -= {row_id(row, name) for row in m._a_rows.get(op.path, [])}
    own = set(m.seeders["a"].ids.get(op.path, []))
    failures = []
    for cred in m.creds:
        listing = await read_all(m.client, op, cred.headers)
        pages = listing if isinstance(listing, list) else [listing]
        expected = 200 if allowed(cred, "GET", op.path) else 403
        if any(status != expected for status, _ in pages):
            failures.append(f"{cred.label}: {[status for status, _ in pages]} (expected {expected}) {pages[-1][1]}")
            continue
        text = json.dumps([body for _, body in pages])
        if found := leaks(m, cred, text):
            failures.append(f"{cred.label}: B's data in the listing: {found}")
        if expected == 200:
            seen = [row_id(row, name) for _, body in pages for row in rows_of(body)]
            # (The user of both tenants may see B's own id: GET /me/tenants lists their memberships.)
            listed = {
                i
                for i in b_ids & set(seen)
                if not (cred.label.startswith("user of A and B") and str(i) in m.both_user_knows)
            }
            if listed:
                failures.append(f"{cred.label}: B's ids {sorted(map(str, listed))} listed")
            if not own <= set(seen):
                failures.append(f"{cred.label}: A's own records {sorted(map(str, own - set(seen)))} missing")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("op", WRITES, ids=ids(WRITES))
async def test_collection_write_lands_in_own_tenant(matrix: Matrix, op: ApiOperation) -> None:
    m = matrix
    failures = []
    for cred in m.creds:
        r = await m.seeders["a"].write(op, headers=cred.headers, expect_success=False)
        ok = allowed(cred, op.method, op.path)
        if (ok and not 200 <= r.status_code < 300) or (not ok and r.status_code != 403):
            failures.append(f"{cred.label}: {r.status_code} (expected {'2xx' if ok else 403}) {r.text[:300]}")
        if found := leaks(m, cred, r.text):
            failures.append(f"{cred.label}: B's data in the body: {found}")
    assert not failures, "\n".join(failures)
    assert await m.b_snapshot() == m.b_baseline, f"{op.label} by A changed what B sees"


@pytest.mark.parametrize("op", REFERENCING, ids=ids(REFERENCING))
async def test_reference_to_a_b_record_is_refused(matrix: Matrix, op: ApiOperation) -> None:
    """A body naming one of B's records (`project_id`, `lead_id` ...) is refused, and nothing is written."""
    m, c, a = matrix, matrix.client, matrix.world.a
    path = op.path
    if op.kind == "by_id":
        own = m.seeders["a"].ids.get(op.collection)
        assert own, f"{op.label}: A has no record to update"
        path = op.at(own[0])
    listing = next(o for o in READS if o.path == op.collection)

    async def a_state() -> Any:
        if op.kind == "by_id":
            return body_of(await c.get(path, headers=a.auth("owner")))
        return await read_all(c, listing, a.auth("owner"), page_size=100)

    before = await a_state()
    failures, tried = [], 0
    for name in reference_fields(DOC, op.body):
        target = referenced_collection(DOC, name)
        if target is None or not m.seeders["b"].ids.get(target):
            continue
        body = await m.seeders["a"].body(op)
        body[name] = m.seeders["b"].ids[target][0]
        tried += 1
        r = await c.request(op.method, path, json=body, headers=a.auth("owner"))
        if not 400 <= r.status_code < 500 or r.status_code in (401, 403):
            failures.append(f"{op.label} with {name}={body[name]} (B's): {r.status_code} {r.text[:300]}")
        if found := leaks(m, m.creds[0], r.text, asked_for=body[name]):
            failures.append(f"{op.label}: B's data in the body: {found}")
    assert tried, f"{op.label}: none of its references points into a collection B has records in"
    assert not failures, "\n".join(failures)
    assert await m.b_snapshot() == m.b_baseline
    assert await a_state() == before, f"{op.label}: a refused request wrote something"


async def test_select_tenant_into_b_is_refused(matrix: Matrix) -> None:
    m, c, b = matrix, matrix.client, matrix.world.b
    failures = []
    for cred in m.creds:
        if cred.label.startswith("user of A and B"):
            continue  # a member of B: selecting it is their right (test_api_auth)
        for wanted in (str(b.id), b.slug):
            r = await c.post(f"{API_PREFIX}/auth/select-tenant", json={"tenant": wanted}, headers=cred.headers)
            if r.status_code != 403 or not is_problem(r) or "access_token" in r.text:
                failures.append(f"{cred.label} → select {wanted}: {r.status_code} {r.text[:200]}")
            if found := leaks(m, cred, r.text, asked_for=wanted):
                failures.append(f"{cred.label} → select {wanted}: B's data {found}")
    assert not failures, "\n".join(failures)
