"""The one module that runs SQL as a tenant (`iafactory.db.scope`), under pressure: a tiny pool,
many interleaved tenants, requests without a tenant, and requests that fail half-way."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import settings_for
from iafactory.db import bootstrap
from iafactory.db.scope import Database
from iafactory.tenancy.context import TenantContext

pytestmark = pytest.mark.anyio


def create_tenants(admin_url: str, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for tid in ids:
            conn.execute(
                "INSERT INTO tenants (id, name, slug, region) VALUES (%s, %s, %s, 'FR')",
                (tid, f"t {tid}", f"t-{tid.hex[:16]}"),
            )
    return ids


@pytest.fixture
async def small_pool(migrated_db: str) -> AsyncIterator[Database]:
    db = bootstrap.database(settings_for(migrated_db, pool_min_size=2, pool_max_size=3), migrated_db)
    async with db:
        yield db


class Boom(Exception):
    pass


async def test_interleaved_tenants_on_a_tiny_pool_never_see_each_other(small_pool: Database, migrated_db: str) -> None:
    tenants = create_tenants(migrated_db, 12)
    rng = random.Random(1234)
    committed: dict[uuid.UUID, set[str]] = {t: set() for t in tenants}
    violations: list[str] = []

    async def request(i: int) -> None:
        kind = rng.random()
        if kind < 0.1:  # no tenant at all
            async with small_pool.anonymous() as tx:
                n = await tx.fetchval("SELECT count(*) FROM projects")
                if n:
                    violations.append(f"anonymous request {i} saw {n} rows")
            return
        tenant = rng.choice(tenants)
        ctx = TenantContext(tenant_id=tenant)
        name = f"{tenant}:{i}"
        if kind < 0.25:  # fails after writing: must leave nothing behind
            with pytest.raises(Boom):
                async with small_pool.tenant(ctx) as tx:
                    await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, %s)", (tenant, name))
                    await asyncio.sleep(0)  # let other requests interleave (not synchronisation)
                    raise Boom
            return
        async with small_pool.tenant(ctx) as tx:
            await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, %s)", (tenant, name))
            await asyncio.sleep(0)
            rows = await tx.fetch("SELECT tenant_id, name FROM projects")
        committed[tenant].add(name)
        foreign = [r for r in rows if r["tenant_id"] != tenant or not r["name"].startswith(str(tenant))]
        if foreign:
            violations.append(f"request {i} as {tenant} saw {foreign[:3]}")

    await asyncio.gather(*(request(i) for i in range(400)))
    assert not violations, violations[:10]
    # What each tenant has is exactly what its successful requests wrote.
    for tenant in tenants:
        async with small_pool.tenant(TenantContext(tenant_id=tenant)) as tx:
            names = {r["name"] for r in await tx.fetch("SELECT name FROM projects")}
        assert names == committed[tenant]


async def test_a_connection_reused_after_a_tenant_carries_no_tenant(migrated_db: str) -> None:
    db = bootstrap.database(settings_for(migrated_db, pool_min_size=1, pool_max_size=1), migrated_db)
    [tenant] = create_tenants(migrated_db, 1)
    async with db:
        async with db.tenant(TenantContext(tenant_id=tenant)) as tx:
            await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'x')", (tenant,))
            assert await tx.fetchval("SELECT current_setting('app.tenant_id')") == str(tenant)
        async with db.anonymous() as tx:
            assert await tx.fetchval("SELECT current_setting('app.tenant_id', true)") == ""
            assert await tx.fetchval("SELECT count(*) FROM projects") == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.anonymous() as tx:
                await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'y')", (tenant,))


async def test_the_anonymous_scope_records_the_request_for_one_transaction_only(migrated_db: str) -> None:
    """Platform functions run without a tenant; their audit rows read app.client_ip and
    app.request_id, set here with SET LOCAL: the next user of the pooled connection sees neither."""
    db = bootstrap.database(settings_for(migrated_db, pool_min_size=1, pool_max_size=1), migrated_db)
    settings = "SELECT current_setting('app.client_ip', true) AS ip, current_setting('app.request_id', true) AS rid"
    async with db:
        async with db.anonymous(client_ip="::ffff:10.0.0.1", request_id="req-42") as tx:
            assert await tx.fetchrow(settings) == {"ip": "::ffff:a00:1", "rid": "req-42"}
        async with db.anonymous() as tx:
            assert await tx.fetchrow(settings) in ({"ip": "", "rid": ""}, {"ip": None, "rid": None})
        for bad in ({"client_ip": "10.0.0.1'; RESET ALL; --"}, {"request_id": "x'; RESET ALL; --"}):
            with pytest.raises(ValueError):
                db.anonymous(**bad)


async def test_a_failed_statement_rolls_back_the_whole_transaction(small_pool: Database, migrated_db: str) -> None:
    [tenant] = create_tenants(migrated_db, 1)
    ctx = TenantContext(tenant_id=tenant)
    with pytest.raises(psycopg.errors.CheckViolation):
        async with small_pool.tenant(ctx) as tx:
            await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'kept?')", (tenant,))
            await tx.execute("INSERT INTO projects (tenant_id, name, status) VALUES (%s, 'bad', 'nope')", (tenant,))
    async with small_pool.tenant(ctx) as tx:
        assert await tx.fetchval("SELECT count(*) FROM projects") == 0


def test_tenant_context_accepts_only_a_real_uuid() -> None:
    with pytest.raises(TypeError):
        TenantContext(tenant_id="00000000-0000-0000-0000-000000000000'; RESET ALL; --")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TenantContext(tenant_id=uuid.uuid4(), role="god")


# --- property: each tenant's view equals its own writes -------------------------------------------

operation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 2), st.text("abcdef", min_size=1, max_size=8)),
    st.tuples(st.just("rename"), st.integers(0, 2), st.integers(0, 20), st.text("xyz", min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 20)),
    # tenant a tries to rename / delete a row that belongs to tenant b (by its real id)
    st.tuples(st.just("trespass"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 20)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=25))
async def test_random_operations_by_random_tenants_match_a_model(small_pool: Database, migrated_db: str, ops) -> None:
    tenants = create_tenants(migrated_db, 3)
    model: dict[uuid.UUID, dict[int, str]] = {t: {} for t in tenants}

    async def view(t: uuid.UUID) -> dict[int, str]:
        async with small_pool.tenant(TenantContext(tenant_id=t)) as tx:
            return {r["id"]: r["name"] for r in await tx.fetch("SELECT id, name FROM projects")}

    for op in ops:
        t = tenants[op[1]]
        ctx = TenantContext(tenant_id=t)
        async with small_pool.tenant(ctx) as tx:
            if op[0] == "insert":
                new_id = await tx.fetchval(
                    "INSERT INTO projects (tenant_id, name) VALUES (%s, %s) RETURNING id", (t, op[2])
                )
                model[t][new_id] = op[2]
            elif op[0] in ("rename", "delete") and model[t]:
                target = sorted(model[t])[op[2] % len(model[t])]
                if op[0] == "rename":
                    await tx.execute("UPDATE projects SET name = %s WHERE id = %s", (op[3], target))
                    model[t][target] = op[3]
                else:
                    await tx.execute("DELETE FROM projects WHERE id = %s", (target,))
                    del model[t][target]
            elif op[0] == "trespass":
                victim = tenants[op[2]]
                if victim != t and model[victim]:
                    target = sorted(model[victim])[op[3] % len(model[victim])]
                    assert await tx.execute("UPDATE projects SET name = 'stolen' WHERE id = %s", (target,)) == 0
                    assert await tx.execute("DELETE FROM projects WHERE id = %s", (target,)) == 0
        for tenant in tenants:
            assert await view(tenant) == model[tenant]


async def test_a_statement_refused_before_sending_leaves_the_transaction_unopened(
    small_pool: Database, migrated_db: str
) -> None:
    """A parameter the driver cannot adapt fails before anything is sent; a caller that goes on
    still gets its tenant set and its transaction opened (never a statement outside them)."""
    [tenant] = create_tenants(migrated_db, 1)
    async with small_pool.tenant(TenantContext(tenant_id=tenant)) as tx:
        with pytest.raises(psycopg.ProgrammingError):
            await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, %s)", (tenant, object()))
        await tx.execute("INSERT INTO projects (tenant_id, name) VALUES (%s, 'kept')", (tenant,))
        assert await tx.fetchval("SELECT current_setting('app.tenant_id')") == str(tenant)
        assert tx.connection.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    async with small_pool.tenant(TenantContext(tenant_id=tenant), read_only=True) as tx:
        assert [r["name"] for r in await tx.fetch("SELECT name FROM projects")] == ["kept"]
