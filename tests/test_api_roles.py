"""Who may write what, generated from the app's route table.

Every WRITE route (POST/PUT/PATCH/DELETE) of the OpenAPI document is called by every kind of
caller, on records of the caller's own tenant: each role's JWT, the read and the write API key, and
a platform administrator. The minimum role per route comes from the role table in
tests/api_support.py, keyed by path prefix:

    resources (iafactory.domains)  member      /members, /api-keys   admin
    /tenant                        owner       /admin/*              platform administrator

so viewer → 403 on every write; member → resource writes only; admin → also members and API
keys, not PATCH /tenant; owner → everything of the tenant. A read key writes nothing; a write key
acts as a member. A write route that matches no entry fails `test_every_write_route_has_a_role`.
A refused write leaves its target as it was.
"""

from __future__ import annotations

import uuid
from typing import Any

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
    required_role,
    resource_prefixes,
    write_role_table,
)

pytestmark = pytest.mark.anyio

# With IAFACTORY_TEST_CELLS=2 (CI's PostgreSQL 15 pass) the world lives in two region cells.
RUNS_ON_TWO_CELLS = True
DOC = offline_openapi()
WRITES = [op for op in api_operations(DOC) if op.path.startswith(API_PREFIX) and op.is_write]
ACTORS = ("owner", "admin", "member", "viewer", "read key", "write key", "platform admin")


def _role(op: ApiOperation) -> str | None:
    try:
        return required_role(op.method, op.path)
    except LookupError:
        return "unknown"


# Role-gated writes (the sign-in steps are not: register/login/select-tenant have their own tests).
GATED = [op for op in WRITES if _role(op) is not None]
CASES = [pytest.param(op, actor, id=f"{op.label} as {actor}") for op in GATED for actor in ACTORS]


def credential(w: ApiWorld, actor: str) -> Credential:
    a = w.a
    if actor in ("read key", "write key"):
        scope = actor.split()[0]
        return Credential(
            actor,
            a.key(scope),
            "viewer" if scope == "read" else "member",
            a.id,
            api_key=True,
            read_only=scope == "read",
        )
    if actor == "platform admin":
        return Credential(actor, w.headers(w.platform_token), platform=True)
    return Credential(actor, a.auth(actor), actor, a.id)


class Roles:
    def __init__(self, world: ApiWorld) -> None:
        self.world = world
        self.seeder = Seeder(world.client, DOC, f"r{uuid.uuid4().hex[:10]}", world.a.auth("owner"), world.a.region)
        self.platform = world.headers(world.platform_token)

    def creator(self, collection: str) -> dict[str, str]:
        return self.platform if required_role("POST", collection) == "platform" else self.world.a.auth("owner")

    async def target(self, op: ApiOperation) -> Any:
        """A fresh record of the caller's tenant (a fresh tenant for the platform's routes) for a
        by-id write, made through the collection's own create route."""
        if op.path == f"{API_PREFIX}/admin/tenants/{{tenant_id}}/erasure-request/confirm":
            # The platform confirms what a tenant asked for (a fresh tenant has no owner to ask):
            # tenant B's owner asks first; A's requests are the tenant routes' own.
            await self.ask_for_erasure(self.world.b)
            return self.world.b.id
        creates = any(o.method == "POST" and o.path == op.collection for o in api_operations(DOC))
        if creates:
            ident = await self.seeder.create(op.collection, headers=self.creator(op.collection))
            assert ident is not None, f"POST {op.collection} returned no id"
            return ident
        if op.id_param == "tenant_id":
            return self.world.a.id
        raise AssertionError(f"{op.label}: no route creates the record it acts on; teach Roles.target")

    async def ask_for_erasure(self, tenant: Any) -> None:
        r = await self.world.client.post(f"{API_PREFIX}/tenant/erasure-requests", json={}, headers=tenant.auth("owner"))
        assert r.status_code == 200, r.text

    async def prepare(self, op: ApiOperation) -> None:
        """A write that acts on the tenant's state rather than on a record: the state it needs."""
        if op.path == f"{API_PREFIX}/tenant/erasure-requests/cancel":
            await self.ask_for_erasure(self.world.a)  # a pending request to cancel

    async def observe(self, op: ApiOperation, ident: Any) -> Any:
        """How the target looks to its owner: its GET by id, else its row in the collection's listing."""
        c, headers = self.world.client, self.creator(op.collection)
        getter = next(
            (
                o
                for o in api_operations(DOC)
                if o.method == "GET" and o.kind == "by_id" and not o.is_action and o.collection == op.collection
            ),
            None,
        )
        if getter is not None:
            r = await c.get(getter.at(ident), headers=headers)
            return r.status_code, body_of(r)
        rows: list[Any] = []
        params: dict[str, Any] = {}
        while True:
            r = await c.get(op.collection, params=params, headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            rows += body if isinstance(body, list) else body.get("items", [])
            if isinstance(body, list) or not body.get("next_cursor"):
                break
            params = {"cursor": body["next_cursor"]}
        name = id_field(DOC, op.collection)
        return [row for row in rows if str(row.get(name, row.get("id"))) == str(ident)]


@pytest.fixture(scope="module")
async def roles(module_api_world: ApiWorld) -> Roles:
    await provision_for_load(module_api_world.admin_url, module_api_world)
    return Roles(module_api_world)


def test_every_write_route_has_a_role() -> None:
    missing = [op.label for op in WRITES if _role(op) == "unknown"]
    assert not missing, (
        f"write routes with no entry in the role table (tests/api_support.py, "
        f"write_role_table): {missing}. Add the minimum role each needs."
    )
    assert len(CASES) >= len(ACTORS) * 10  # the generator found the routes


def test_role_table_says_what_the_product_promises() -> None:
    for prefix in resource_prefixes():
        for method in ("POST", "PATCH", "DELETE"):
            assert required_role(method, f"{prefix}/{{item_id}}") == "member"
    assert (
        required_role("POST", f"{API_PREFIX}/members") == required_role("DELETE", f"{API_PREFIX}/api-keys/x") == "admin"
    )
    assert required_role("PATCH", f"{API_PREFIX}/tenant") == "owner"
    assert required_role("PATCH", f"{API_PREFIX}/admin/tenants/x") == "platform"
    assert required_role("POST", f"{API_PREFIX}/auth/login") is None
    with pytest.raises(LookupError):
        required_role("POST", f"{API_PREFIX}/tenants-v2")  # a prefix is a whole path segment
    assert set(write_role_table().values()) <= {None, "platform", "viewer", "member", "admin", "owner"}


@pytest.mark.parametrize(("op", "actor"), CASES)
async def test_write_route_role(roles: Roles, op: ApiOperation, actor: str) -> None:
    w = roles.world
    cred = credential(w, actor)
    may = allowed(cred, op.method, op.path)
    path = op.path
    before = None
    if op.kind == "by_id":
        ident = await roles.target(op)
        path = op.at(ident)
        if not may:
            before = await roles.observe(op, ident)
    elif op.kind != "collection":
        pytest.fail(f"{op.label}: a route shape the role matrix cannot drive")
    else:
        await roles.prepare(op)
    r = await roles.seeder.write(op, path, headers=cred.headers, expect_success=False)
    if may:
        assert 200 <= r.status_code < 300, (
            f"{op.label} as {actor}: the table ({required_role(op.method, op.path)}) "
            f"allows it, the app answered {r.status_code} {r.text}"
        )
    else:
        assert r.status_code == 403, (
            f"{op.label} as {actor}: needs {required_role(op.method, op.path)}, "
            f"expected 403, got {r.status_code} {r.text}"
        )
        assert r.headers["content-type"].startswith("application/problem+json")
        if before is not None:
            assert await roles.observe(op, ident) == before, f"{op.label} as {actor} was refused but changed the record"
