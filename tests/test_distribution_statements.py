"""Every SQL statement the application sends on a tenant table names its tenant.

A distributed PostgreSQL (Citus) routes a statement to one tenant's shard only on an explicit
`tenant_id = <value>`; with the row policy alone it goes to every shard. So the whole API is
driven here (every route of the OpenAPI document, the indexing worker, and the operator's export,
erasure, import and monthly grant) through a relay that records what reaches the server on the
wire (tests/wire_capture.py), whatever the client library does, and each recorded statement is
read by the rules of tests/sql_rules.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from api_support import (
    API_PREFIX,
    PASSWORD,
    Seeder,
    api_operations,
    app_client,
    build_world,
    login,
    offline_openapi,
    provision_for_load,
    required_role,
    tenant_writable_collections,
)
from conftest import settings_for
from iafactory.db import bootstrap, server
from iafactory.db.scope import operator_transaction
from iafactory.knowledge import worker
from iafactory.knowledge.embeddings import embedder
from iafactory.tenancy import portability, service
from sql_rules import blank_literals, check_sql, split_statements, table_references
from wire_capture import WireCapture

pytestmark = pytest.mark.anyio

DOC = offline_openapi()

# Statements an operator command sends on purpose across tenants, with the reason.
OPERATOR_EXCEPTIONS = {
    r"^SELECT setval\(pg_get_serial_sequence\(": "import: an identity sequence must pass every tenant's ids",
}


def _relay_conninfo(conninfo: str, port: int) -> str:
    params = conninfo_to_dict(conninfo)
    params.update(host="127.0.0.1", port=str(port), sslmode="disable", gssencmode="disable")
    return make_conninfo(**params)


@pytest.fixture(scope="module")
async def captured(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    relay = WireCapture(module_db)
    port = await relay.start()
    admin = _relay_conninfo(module_db, port)
    app_url = _relay_conninfo(server.app_conninfo(settings_for(module_db), module_db), port)
    try:
        async with app_client(module_db, app_database_url=app_url, embedding_provider="none") as (client, _, settings):
            world = await build_world(client, admin, settings)
            await provision_for_load(admin, world)
            db = bootstrap.database(settings, module_db)
            async with db:
                calls, indexed = await _drive(client, world, lambda: worker.drain(db, embedder(settings)))
                # Operator commands, through the relay too.
                archive = tmp_path_factory.mktemp("export") / "b.tar.gz"
                await portability.export_tenant(admin, world.b.slug, archive)
                await portability.erase_tenant(admin, world.b.slug, world.b.slug)
                await portability.import_tenant(admin, archive)
                async with operator_transaction(admin) as tx:
                    await service.grant_monthly(tx)
                # A statement that forgets its tenant, sent the same way: the reading must see it.
                from iafactory.tenancy.context import TenantContext

                async with db.tenant(TenantContext(tenant_id=world.a.id), read_only=True) as tx:
                    await tx.fetch("SELECT id FROM projects WHERE name <> 'canary-without-tenant'")
        yield {"statements": list(relay.statements), "calls": calls, "indexed": indexed}
    finally:
        await relay.close()


SESSION_ENDING = {
    f"POST {API_PREFIX}/auth/logout",
    f"POST {API_PREFIX}/auth/logout-all",
    f"POST {API_PREFIX}/me/password",
    f"DELETE {API_PREFIX}/me/sessions/{{session_id}}",
}


async def _drive(client: Any, world: Any, run_worker: Any) -> tuple[list[tuple[str, int]], int]:
    """Every route under /api/v1 once, with a credential allowed to call it: creates first (each
    collection seeded from the schema), then reads and updates, the indexing worker, then deletes."""
    owner = world.a.auth("owner")
    platform = world.headers(world.platform_token)
    seeder = Seeder(client, DOC, "wire", owner)
    # The routes that end the caller's sessions run as a person of their own, not as the owner.
    email = f"wire-throwaway-{world.a.slug}@example.ch"
    r = await client.post(f"{API_PREFIX}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 202, r.text
    throwaway = world.headers(await login(client, email))
    calls: list[tuple[str, int]] = []
    for collection, op in tenant_writable_collections(DOC).items():
        if op.method == "POST":
            await seeder.create(collection)
        else:
            calls.append((op.label, (await seeder.write(op)).status_code))
    ops = [op for op in api_operations(DOC) if op.path.startswith(API_PREFIX) and op.kind is not None]
    later = []
    for op in ops:
        headers = platform if required_role(op.method, op.path) == "platform" else owner
        if op.label in SESSION_ENDING:
            headers = throwaway
        if op.kind == "by_id":
            if op.collection == f"{API_PREFIX}/admin/tenants":
                ident: Any = world.b.id  # not A, whose plan a generated body could lower mid-run
            elif seeder.ids.get(op.collection):
                ident = seeder.ids[op.collection][-1]
            else:
                continue
            path = op.at(ident)
        else:
            path = op.path
        if op.method == "DELETE":
            later.append((op, path, headers))
            continue
        if op.method == "GET":
            r = await client.get(path, params=dict(op.required_query), headers=headers)
        elif op.label == f"POST {API_PREFIX}/auth/select-tenant":
            r = await client.post(path, json={"tenant": str(world.a.id)}, headers=world.headers(world.both_user_token))
        elif op.label == f"POST {API_PREFIX}/knowledge-base/search":
            r = await client.post(path, json={"query": "wire document", "mode": "hybrid"}, headers=owner)
        elif op.kind == "collection" and op.method == "POST" and op.collection in seeder.ids:
            continue  # created above
        else:
            r = await seeder.write(op, path, headers=headers, expect_success=False)
        calls.append((op.label, r.status_code))
    indexed = await run_worker()
    for op, path, headers in later:
        r = await client.delete(path, headers=headers)
        calls.append((op.label, r.status_code))
    return calls, indexed


def _catalog(admin: str) -> tuple[set[str], set[str]]:
    """Tenant tables (and tenants), and the names of functions with no IMMUTABLE variant."""
    with psycopg.connect(admin) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                """SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND a.attname = 'tenant_id'"""
            )
        }
        non_immutable = {
            r[0]
            for r in conn.execute("SELECT proname FROM pg_proc GROUP BY proname HAVING bool_and(provolatile <> 'i')")
        }
    return tables | {"tenants"}, non_immutable


async def test_the_flows_ran(captured: dict[str, Any]) -> None:
    # Guards the check below against a flow that silently did nothing.
    failed = [(label, status) for label, status in captured["calls"] if status >= 500 or status == 429]
    assert not failed, failed
    assert sum(200 <= status < 300 for _, status in captured["calls"]) >= 50, captured["calls"]
    assert captured["indexed"] >= 1


async def test_every_statement_on_a_tenant_table_names_its_tenant(captured: dict[str, Any], module_db: str) -> None:
    tables, non_immutable = _catalog(module_db)
    findings, touched = [], set()
    for text in captured["statements"]:
        for statement in split_statements(blank_literals(text)):
            statement = re.sub(r"^prepare\s+\w+\s*(?:\([^)]*\))?\s+as\s+", "", statement, flags=re.IGNORECASE)
            if any(re.search(p, statement, re.IGNORECASE) for p in OPERATOR_EXCEPTIONS):
                continue
            touched |= {table for _, table, _ in table_references(statement, tables)}
            findings += [str(f) for f in check_sql(statement, tables, non_immutable)]
    canary = [f for f in findings if "projects" in f and "name <> ''" in f]
    assert canary, "the planted statement without a tenant was not seen: the capture or the rules are broken"
    findings = [f for f in findings if f not in canary]
    assert not findings, "\n".join(sorted(set(findings)))
    # Not vacuous: the flows reached (nearly) every tenant table.
    assert len(touched) >= len(tables) - 2, sorted(tables - touched)
