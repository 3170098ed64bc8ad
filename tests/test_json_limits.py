"""Free-form JSON fields: limits on the way in, and nothing stored can break the way out.

The defect: JSON nested 256-985 levels deep in any JSON field was stored, and then pydantic could
not encode it: the POST answered 500 after its commit, and every later list or get of the tenant
answered 500 until the row was deleted (usage events are append-only: for good).

* Every JSON field of every operation, found in the OpenAPI document (so a new one is covered),
  refuses a value deeper than the limit with 422 naming the field, and nothing is written.
* The other limits (keys, items, string length, size, finite numbers) on one field.
* Rows already holding such values (written here as the database owner, as an old version of the
  API or an operator could have) are served: get and list answer 200 with the value intact, at
  any depth PostgreSQL can store.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from api_support import (
    API_PREFIX,
    ApiOperation,
    ApiWorld,
    Seeder,
    api_operations,
    offline_openapi,
    provision_for_load,
    required_role,
    resolve_schema,
)
from iafactory import jsonvalues
from iafactory.domains import RESOURCES

pytestmark = pytest.mark.anyio

DOC = offline_openapi()


def free_form_paths(schema: dict[str, Any] | None, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (inside a body) of the free-form JSON fields: objects without declared properties and
    arrays of anything. An array of objects (usage events) is entered through its first item."""
    schema = resolve_schema(DOC, schema) or {}
    found: list[tuple[Any, ...]] = []
    for option in schema.get("anyOf", []):
        option = resolve_schema(DOC, option) or {}
        if option.get("type") != "null":
            found += free_form_paths(option, prefix)
    kind = schema.get("type")
    if kind == "object" and "properties" not in schema:
        return [prefix]
    if kind == "array":
        items = resolve_schema(DOC, schema.get("items")) or {}
        return (
            [prefix]
            if not items or ("type" not in items and "anyOf" not in items)
            else free_form_paths(items, (*prefix, 0))
        )
    for name, prop in schema.get("properties", {}).items():
        found += free_form_paths(prop, (*prefix, name))
    return found


JSON_FIELDS = [
    (op, path)
    for op in api_operations(DOC)
    if op.body is not None and op.path.startswith(API_PREFIX)
    for path in free_form_paths(op.body)
]


def test_the_route_table_has_json_fields() -> None:
    """The generated cases below are not vacuous: the document shows the JSON fields we know of."""
    labels = {f"{op.label} {'.'.join(map(str, path))}" for op, path in JSON_FIELDS}
    for expected in (
        "POST /api/v1/pme-analyses inputs",
        "PATCH /api/v1/tenant settings",
        "POST /api/v1/usage-events events.0.properties",
        "POST /api/v1/admin/tenants metadata",
        "POST /api/v1/voice/conversations messages",
        "POST /api/v1/knowledge-base/search metadata",
    ):
        assert expected in labels, sorted(labels)


def nested(depth: int, kind: str = "object") -> Any:
    """A JSON value `depth` levels deep (an object or an array at every level)."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


def put(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


def field_kind(op: ApiOperation, path: tuple[Any, ...]) -> str:
    schema = resolve_schema(DOC, op.body)
    for step in path:
        schema = resolve_schema(DOC, schema.get("items") if isinstance(step, int) else schema["properties"][step])
        options = [resolve_schema(DOC, o) for o in schema.get("anyOf", [])]
        schema = next((o for o in options if o.get("type") != "null"), schema)
    return "array" if schema.get("type") == "array" else "object"


async def table_counts(admin_url: str) -> dict[str, int]:
    """Rows of every table of the schema: nothing may be written by a refused request."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in await (
                await conn.execute(
                    "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' "
                    "AND relname NOT IN ('rate_counters') ORDER BY 1"
                )
            ).fetchall()
        ]
        counts = {}
        for table in tables:
            counts[table] = (
                await (await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))).fetchone()
            )[0]
        return counts


@pytest.fixture(scope="module")
async def world(module_api_world: ApiWorld) -> ApiWorld:
    await provision_for_load(module_api_world.admin_url, module_api_world)
    return module_api_world


def headers_for(w: ApiWorld, op: ApiOperation) -> dict[str, str]:
    return w.headers(w.platform_token) if required_role(op.method, op.path) == "platform" else w.a.auth("owner")


@pytest.mark.parametrize("depth", [33, 300, 900])
@pytest.mark.parametrize(
    ("op", "path"), JSON_FIELDS, ids=[f"{op.label} {'.'.join(map(str, p))}" for op, p in JSON_FIELDS]
)
async def test_every_json_field_refuses_a_value_deeper_than_the_limit(
    world: ApiWorld, op: ApiOperation, path: tuple[Any, ...], depth: int
) -> None:
    headers = headers_for(world, op)
    seeder = Seeder(world.client, DOC, "deep", headers)
    url = op.path
    if op.kind == "by_id":
        url = op.at(
            await seeder.create(op.collection) if op.collection != f"{API_PREFIX}/admin/tenants" else world.a.id
        )
    body = put(await seeder.body(op, full=True), path, nested(depth, field_kind(op, path)))
    before = await table_counts(world.admin_url)
    r = await world.client.request(op.method, url, json=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    field = ".".join(["body", *map(str, path)])
    [error] = [e for e in r.json()["errors"] if e["field"] == field]
    assert error["message"].startswith("nested deeper than 32 levels (at "), error
    assert await table_counts(world.admin_url) == before


LIMIT_CASES = {
    "keys": ({f"k{i}": i for i in range(1001)}, "more than 1000 keys in one object (at the top level)"),
    "items": ({"list": list(range(10_001))}, "more than 10000 items in one array (at list)"),
    "string": ({"note": "x" * 32_769}, "a string longer than 32768 characters (at note)"),
    "key length": ({"k" * 32_769: 1}, "a key longer than 32768 characters (at the top level)"),
    "size": ({f"k{i}": "x" * 100 for i in range(700)}, "must be at most 65536 bytes of JSON"),
    "depth inside an array": ({"rows": [1, 2, nested(40, "array")]}, "nested deeper than 32 levels (at rows[2]"),
}


@pytest.mark.parametrize("case", LIMIT_CASES)
async def test_other_json_limits_name_the_field_and_write_nothing(world: ApiWorld, case: str) -> None:
    value, message = LIMIT_CASES[case]
    before = await table_counts(world.admin_url)
    r = await world.client.post(
        f"{API_PREFIX}/pme-analyses",
        json={"company_name": "Sarl Atlas", "inputs": value},
        headers=world.a.auth("member"),
    )
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["field"] == "body.inputs" and error["message"].startswith(message), error
    assert await table_counts(world.admin_url) == before


async def test_non_finite_numbers_are_refused(world: ApiWorld) -> None:
    # Python's JSON parser accepts NaN and Infinity; JSON (and PostgreSQL's jsonb) does not.
    before = await table_counts(world.admin_url)
    r = await world.client.post(
        f"{API_PREFIX}/pme-analyses",
        content='{"company_name": "X", "inputs": {"r": NaN}}',
        headers={**world.a.auth("member"), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0] == {
        "field": "body.inputs",
        "message": "numbers must be finite, not nan (at r)",
        "type": "value_error",
    }
    assert await table_counts(world.admin_url) == before


def test_limits_come_from_the_settings() -> None:
    from iafactory.config import Settings

    limits = Settings(json_max_depth=4, json_max_keys=2).json_limits
    jsonvalues.check(nested(4), limits)
    with pytest.raises(ValueError, match="nested deeper than 4 levels"):
        jsonvalues.check(nested(5), limits)
    with pytest.raises(ValueError, match="more than 2 keys"):
        jsonvalues.check({"a": 1, "b": 2, "c": 3}, limits)


# --- Stored values of any depth are served ---------------------------------------------------------

# Deep enough for pydantic to refuse (255), for json.loads to refuse (~1,000), and far beyond.
STORED_DEPTHS = [300, 990, 5_000]


def compact(value: Any) -> str:
    return jsonvalues.dumps(value)


async def store(admin_url: str, table: str, column: str, key: tuple[str, Any], value: Any) -> None:
    """Write `value` into one row as the database owner (no API, no RLS): what an old version of
    the API or an operator's SQL could have left behind."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("UPDATE {} SET {} = %s::jsonb WHERE {} = %s").format(
                sql.Identifier(table), sql.Identifier(column), sql.Identifier(key[0])
            ),
            (compact(value), key[1]),
        )


def assert_served(r: httpx.Response, column: str, value: Any) -> None:
    assert r.status_code == 200, r.text[:500]
    assert f'"{column}":{compact(value)}' in re.sub(r'":\s+', '":', r.text)


JSON_RESOURCES = [(spec, column) for spec in RESOURCES for column in sorted(spec.json_columns)]


@pytest.mark.parametrize("depth", STORED_DEPTHS)
@pytest.mark.parametrize(("spec", "column"), JSON_RESOURCES, ids=[f"{s.name}.{c}" for s, c in JSON_RESOURCES])
async def test_a_stored_deep_value_is_served_by_get_and_list(
    world: ApiWorld, spec: Any, column: str, depth: int
) -> None:
    seeder = Seeder(world.client, DOC, "stored", world.a.auth("owner"))
    ident = await seeder.create(f"{API_PREFIX}/{spec.name}")
    is_array = "list" in str(spec.update.model_fields[column].annotation)
    value = nested(depth, "array" if is_array else "object")
    await store(world.admin_url, spec.table, column, ("id", ident), value)
    assert_served(
        await world.client.get(f"{API_PREFIX}/{spec.name}/{ident}", headers=world.a.auth("viewer")), column, value
    )
    assert_served(
        await world.client.get(f"{API_PREFIX}/{spec.name}", params={"limit": 100}, headers=world.a.auth("viewer")),
        column,
        value,
    )
    # And the record can be repaired through the API.
    r = await world.client.patch(
        f"{API_PREFIX}/{spec.name}/{ident}", json={column: [] if is_array else {}}, headers=world.a.auth("owner")
    )
    assert r.status_code == 200, r.text


async def test_a_stored_deep_usage_event_does_not_poison_the_append_only_log(world: ApiWorld) -> None:
    r = await world.client.post(
        f"{API_PREFIX}/usage-events",
        json={
            "events": [
                {"event_type": "tokens", "quantity": 1, "idempotency_key": "deep-1"},
                {"event_type": "tokens", "quantity": 2, "idempotency_key": "deep-2"},
            ]
        },
        headers=world.a.auth("member"),
    )
    assert r.status_code == 200, r.text
    for depth in STORED_DEPTHS:
        value = nested(depth)
        await store(world.admin_url, "usage_events", "properties", ("idempotency_key", "deep-1"), value)
        r = await world.client.get(f"{API_PREFIX}/usage-events", params={"limit": 100}, headers=world.a.auth("viewer"))
        assert_served(r, "properties", value)
        assert '"idempotency_key":"deep-2"' in r.text


async def test_stored_deep_tenant_settings_and_audit_details_are_served(world: ApiWorld) -> None:
    value = nested(STORED_DEPTHS[1])
    await store(world.admin_url, "tenants", "metadata", ("id", world.a.id), value)
    await store(world.admin_url, "tenants", "settings", ("id", world.a.id), {"deep": value})
    assert_served(
        await world.client.get(f"{API_PREFIX}/tenant", headers=world.a.auth("viewer")), "settings", {"deep": value}
    )
    platform = world.headers(world.platform_token)
    assert_served(
        await world.client.get(f"{API_PREFIX}/admin/tenants/{world.a.id}", headers=platform), "metadata", value
    )
    assert_served(
        await world.client.get(f"{API_PREFIX}/admin/tenants", params={"limit": 100}, headers=platform),
        "metadata",
        value,
    )
    async with await psycopg.AsyncConnection.connect(world.admin_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO audit_events (tenant_id, action, details) VALUES (%s, 'test.deep', %s::jsonb)",
            (world.a.id, compact(value)),
        )
    assert_served(
        await world.client.get(f"{API_PREFIX}/audit-events", params={"limit": 100}, headers=world.a.auth("admin")),
        "details",
        value,
    )
    await store(world.admin_url, "tenants", "metadata", ("id", world.a.id), {})
    await store(world.admin_url, "tenants", "settings", ("id", world.a.id), {})


def test_every_api_route_renders_through_the_robust_renderer() -> None:
    """A router made with a bare APIRouter would encode with pydantic alone, and fail on such rows."""
    from iafactory.app import api_routers
    from iafactory.http.rendering import RenderedRoute

    routes = [route for router in api_routers() for route in router.routes]
    assert routes and all(isinstance(route, RenderedRoute) for route in routes), [
        getattr(r, "path", r) for r in routes if not isinstance(r, RenderedRoute)
    ]
