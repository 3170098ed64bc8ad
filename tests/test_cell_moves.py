"""Moving a tenant between region cells (issue 12): `iafactory tenants move SLUG --region XX`.

Two cells and a directory are real databases on the test server. The DZ tenant has a row in every
tenant table (tests/catalog_rows.py, so a table added later is moved too), a member who signs in
and an API key made through the API. Crashes are deterministic: IAFACTORY_MOVE_CRASH_AFTER=<step>
makes the mover SIGKILL itself right after recording that step."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest

from api_support import fast_settings, login
from catalog_rows import load_tables, seed_tenant_rows
from conftest import _create_database, _drop_database, run_cli
from iafactory.app import cell_pools, create_app
from iafactory.db import server
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import portability
from iafactory.tenancy.context import TenantContext

pytestmark = pytest.mark.anyio

SLUG = "ecole-alger"
OWNER = "directrice@ecole-alger.dz"
PASSWORD = "mot de passe de la directrice"


def cells_json(urls: dict[str, str]) -> str:
    return json.dumps(
        {"dz": {"url": urls["dz"], "regions": ["DZ"]}, "eu": {"url": urls["eu"], "regions": ["CH", "FR", "BE", "CA"]}}
    )


def cli(urls: dict[str, str], *args: str, crash_after: str | None = None, input: str | None = None) -> Any:
    env = {"IAFACTORY_CELLS": cells_json(urls)}
    if crash_after:
        env["IAFACTORY_MOVE_CRASH_AFTER"] = crash_after
    return run_cli(*args, db_url=urls["directory"], env=env, input=input)


def move(urls: dict[str, str], crash_after: str | None = None) -> Any:
    return cli(urls, "tenants", "move", SLUG, "--region", "CH", crash_after=crash_after)


def one(url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def tenant_counts(url: str, tenant_id: uuid.UUID) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {
            t: conn.execute(f'SELECT count(*) FROM "{t}" WHERE tenant_id = %s', (tenant_id,)).fetchone()[0]
            for t in load_tables(conn)
        }


async def checksums(url: str, tenant_id: uuid.UUID) -> dict[str, Any]:
    async with operator_transaction(url, TenantContext(tenant_id=tenant_id)) as tx:
        tables = await portability.tenant_tables(tx)
        return await portability.table_checksums(tx, tenant_id, tables, await portability.user_columns(tx, tables))


@pytest.fixture(scope="module")
def template(server_url: str) -> Iterator[dict[str, Any]]:
    """Directory + DZ cell + EU cell, migrated, once per module: the DZ tenant with its owner and
    a row in every tenant table. Each test gets copies (CREATE DATABASE ... TEMPLATE)."""
    names, urls = {}, {}
    for role in ("directory", "dz", "eu"):
        names[role], urls[role] = _create_database(server_url)
    try:
        migrated = cli(urls, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        made = cli(urls, "tenants", "create", "--name", "École", "--slug", SLUG, "--region", "DZ")
        assert made.returncode == 0, made.stderr
        added = cli(
            urls, "tenants", "add-user", SLUG, OWNER, "--role", "owner", "--password-stdin", input=PASSWORD + "\n"
        )
        assert added.returncode == 0, added.stderr
        tenant_id = one(urls["dz"], "SELECT id FROM tenants WHERE slug = %s", SLUG)
        owner_id = one(urls["dz"], "SELECT id FROM users WHERE email = %s", OWNER)
        with psycopg.connect(urls["dz"], autocommit=True) as conn:
            conn.execute("SELECT platform.grant_credits(%s, 1000, 'test credits', 'seed')", (tenant_id,))
            tables = load_tables(conn)
        seed_tenant_rows(urls["dz"], tables, tenant_id, {"users": {"id": owner_id}})
        yield {"names": names, "tenant_id": tenant_id, "tables": tables}
    finally:
        for name in names.values():
            _drop_database(server_url, name)


@pytest.fixture
def world(server_url: str, template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    names, urls = {}, {}
    with psycopg.connect(server_url, autocommit=True) as conn:
        for role, source in template["names"].items():
            names[role] = f"iaf_test_{uuid.uuid4().hex[:12]}"
            conn.execute(f'CREATE DATABASE "{names[role]}" TEMPLATE "{source}"')
            urls[role] = server.with_database(server_url, names[role])
    try:
        yield {**template, "urls": urls}
    finally:
        for name in names.values():
            _drop_database(server_url, name)


@asynccontextmanager
async def client_for(urls: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in process, routing through the directory to both cells (fresh caches)."""
    settings = fast_settings(urls["directory"], cells=cells_json(urls))
    pools = cell_pools(settings)
    await pools.open()
    app = create_app(settings, cells=pools)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        app.state.load.close()
        await pools.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_project(client: httpx.AsyncClient, headers: dict[str, str], name: str) -> httpx.Response:
    return await client.post("/api/v1/projects", json={"name": name}, headers=headers)


async def assert_moved(world: dict[str, Any], before: dict[str, int], sums: dict[str, Any]) -> None:
    urls, tenant_id = world["urls"], world["tenant_id"]
    # Every tenant table had a row of the tenant, and the target has exactly the same rows.
    assert all(before.values()) and set(before) == set(world["tables"]), before
    after = tenant_counts(urls["eu"], tenant_id)
    assert {t: n for t, n in after.items() if t != "audit_events"} == {
        t: n for t, n in before.items() if t != "audit_events"
    }
    moved_sums = await checksums(urls["eu"], tenant_id)
    assert {t: s for t, s in moved_sums.items() if t != "audit_events"} == {
        t: s for t, s in sums.items() if t != "audit_events"
    }
    # The old cell holds nothing of the tenant: no row in any tenant table, no tenant row, no
    # slug, no account of its owner (who belonged to no other tenant there); the erasure is noted.
    assert not any(tenant_counts(urls["dz"], tenant_id).values())
    assert one(urls["dz"], "SELECT count(*) FROM tenants WHERE id = %s", tenant_id) == 0
    assert one(urls["dz"], "SELECT count(*) FROM tenant_slugs WHERE tenant = %s", tenant_id) == 0
    assert one(urls["dz"], "SELECT count(*) FROM tenant_freezes") == 0
    assert one(urls["dz"], "SELECT count(*) FROM users WHERE email = %s", OWNER) == 0
    assert (
        one(urls["dz"], "SELECT reason FROM tenant_erasures WHERE erased_tenant = %s", tenant_id) == "moved to cell eu"
    )
    # The target holds it in CH, writable; the directory routes there.
    assert one(urls["eu"], "SELECT region FROM tenants WHERE id = %s", tenant_id) == "CH"
    assert one(urls["eu"], "SELECT count(*) FROM tenant_freezes") == 0
    route = one(
        urls["directory"], "SELECT row(cell, region, moving_to)::text FROM directory.tenants WHERE id = %s", tenant_id
    )
    assert route == "(eu,CH,)"
    journal = one(
        urls["directory"],
        "SELECT row_to_json(m) FROM directory.tenant_moves m WHERE tenant_id = %s ORDER BY id DESC LIMIT 1",
        tenant_id,
    )
    assert journal["step"] == "done" and journal["from_cell"] == "dz" and journal["to_cell"] == "eu"
    assert journal["checksums"]["source"] == journal["checksums"]["target"]
    # Audited in both cells: the target's log has the move; the source keeps the erasure note.
    actions = {
        a
        for (a,) in psycopg.connect(urls["eu"], autocommit=True).execute(
            "SELECT action FROM audit_events WHERE tenant_id = %s", (tenant_id,)
        )
    }
    assert {"tenant.move_started", "tenant.moved_in", "tenant.move_finished"} <= actions


async def move_and_check_credentials(world: dict[str, Any]) -> None:
    """The happy path: a move keeps rows, ids and API keys; old tokens are refused (401)."""
    urls, tenant_id = world["urls"], world["tenant_id"]
    async with client_for(urls) as client:
        token = await login(client, OWNER, PASSWORD, tenant=SLUG)
        r = await client.post("/api/v1/api-keys", json={"name": "k", "scope": "write"}, headers=bearer(token))
        assert r.status_code == 201, r.text
        key = {"X-API-Key": r.json()["key"]}
        made = await new_project(client, bearer(token), "before the move")
        assert made.status_code == 201, made.text
    before, sums = tenant_counts(urls["dz"], tenant_id), await checksums(urls["dz"], tenant_id)

    result = move(urls)
    assert result.returncode == 0, result.stderr
    assert "moved ecole-alger from cell dz (DZ) to cell eu (CH)" in result.stdout
    await assert_moved(world, before, sums)

    async with client_for(urls) as client:
        # The old token names cell dz: refused, the client signs in again (or selects the tenant again).
        old = await client.get("/api/v1/projects", headers=bearer(token))
        assert old.status_code == 401 and "sign in again" in old.json()["detail"]
        # The API key keeps working, reads and writes, served by the new cell.
        listed = await client.get("/api/v1/projects", headers=key)
        assert listed.status_code == 200, listed.text
        assert made.json()["id"] in {p["id"] for p in listed.json()["items"]}
        assert (await new_project(client, key, "by key after the move")).status_code == 201
        # A new sign-in goes to the new cell; new ids do not collide with the copied ones.
        fresh = await login(client, OWNER, PASSWORD, tenant=SLUG)
        again = await new_project(client, bearer(fresh), "after the move")
        assert again.status_code == 201, again.text
        assert again.json()["id"] > made.json()["id"]
        # The same id reads the same record.
        got = await client.get(f"/api/v1/projects/{made.json()['id']}", headers=bearer(fresh))
        assert got.status_code == 200 and got.json()["name"] == "before the move"

    # Nothing left to move.
    again_move = move(urls)
    assert again_move.returncode == 1 and "already in CH (cell eu)" in again_move.stderr


async def test_writes_during_the_move_are_refused_and_a_mover_killed_after_any_step_resumes(
    world: dict[str, Any],
) -> None:
    urls, tenant_id = world["urls"], world["tenant_id"]
    async with client_for(urls) as client:
        token = await login(client, OWNER, PASSWORD, tenant=SLUG)
        made = await new_project(client, bearer(token), "committed before the freeze")
        assert made.status_code == 201
    before, sums = tenant_counts(urls["dz"], tenant_id), await checksums(urls["dz"], tenant_id)
    # Each run does one more step, then is killed (-9); "imported" is inside the copy step: the
    # target's transaction committed, the journal does not say so yet (the next run copies again).
    for step in ["started", "frozen", "imported", "copied", "switched", "erased"]:
        killed = move(urls, crash_after=step)
        assert killed.returncode == -9, (step, killed.stdout, killed.stderr)
        journal = one(urls["directory"], "SELECT step FROM directory.tenant_moves WHERE tenant_id = %s", tenant_id)
        assert journal == ("frozen" if step == "imported" else step)
        if step == "frozen":
            await writes_are_refused(world, token, before)
    result = move(urls)
    assert result.returncode == 0, result.stderr
    assert "resuming the move of ecole-alger to CH after step erased" in result.stdout
    await assert_moved(world, before, sums)
    assert one(urls["directory"], "SELECT count(*) FROM directory.tenant_moves WHERE tenant_id = %s", tenant_id) == 1
    async with client_for(urls) as client:
        fresh = await login(client, OWNER, PASSWORD, tenant=SLUG)
        listed = (await client.get("/api/v1/projects", headers=bearer(fresh))).json()["items"]
        assert "committed before the freeze" in {p["name"] for p in listed}
        assert (await new_project(client, bearer(fresh), "after the move")).status_code == 201


async def writes_are_refused(world: dict[str, Any], token: str, before: dict[str, int]) -> None:
    """Frozen: the tenant is read-only in its cell, writes answer 503 + Retry-After and leave nothing."""
    urls, tenant_id = world["urls"], world["tenant_id"]
    assert one(urls["directory"], "SELECT moving_to FROM directory.tenants WHERE id = %s", tenant_id) == "eu"
    async with client_for(urls) as client:
        refused = await new_project(client, bearer(token), "during the move")
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "30"
        assert "being moved" in refused.json()["detail"]
        reads = await client.get("/api/v1/projects", headers=bearer(token))
        assert reads.status_code == 200 and len(reads.json()["items"]) == before["projects"]
    # The refused write left nothing (the audit log has the move's start).
    assert {t: n for t, n in tenant_counts(urls["dz"], tenant_id).items() if t != "audit_events"} == {
        t: n for t, n in before.items() if t != "audit_events"
    }


async def test_a_failed_copy_leaves_the_tenant_whole_then_a_move_keeps_rows_ids_and_api_keys(
    world: dict[str, Any],
) -> None:
    urls, tenant_id = world["urls"], world["tenant_id"]
    before = tenant_counts(urls["dz"], tenant_id)
    # The target refuses the copy: its slug registry already has the slug (another tenant's).
    with psycopg.connect(urls["eu"], autocommit=True) as conn:
        conn.execute("INSERT INTO tenant_slugs (slug, tenant) VALUES (%s, %s)", (SLUG, uuid.uuid4()))
    result = move(urls)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the copy to cell eu failed, the tenant stays writable in cell dz: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert (
        one(
            urls["directory"],
            "SELECT row(cell, region, moving_to)::text FROM directory.tenants WHERE id = %s",
            tenant_id,
        )
        == "(dz,DZ,)"
    )
    journal = one(
        urls["directory"], "SELECT row_to_json(m) FROM directory.tenant_moves m WHERE tenant_id = %s", tenant_id
    )
    assert journal["step"] == "failed" and "tenant_slugs" in journal["error"]
    assert not any(tenant_counts(urls["eu"], tenant_id).values())
    assert one(urls["eu"], "SELECT count(*) FROM tenants WHERE id = %s", tenant_id) == 0
    assert one(urls["dz"], "SELECT count(*) FROM tenant_freezes") == 0
    after = tenant_counts(urls["dz"], tenant_id)
    assert {t: n for t, n in after.items() if t != "audit_events"} == {
        t: n for t, n in before.items() if t != "audit_events"
    }
    async with client_for(urls) as client:
        token = await login(client, OWNER, PASSWORD, tenant=SLUG)
        assert (await new_project(client, bearer(token), "after the failed move")).status_code == 201

    # Once the target no longer refuses, the same tenant moves (a new journal entry).
    with psycopg.connect(urls["eu"], autocommit=True) as conn:
        conn.execute("DELETE FROM tenant_slugs WHERE slug = %s", (SLUG,))
    await move_and_check_credentials(world)
