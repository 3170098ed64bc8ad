"""Overload: slow CPU work holds no database connection, full queues shed at once, a client that
went away costs nothing, one tenant's flood leaves room to the others.

Each test runs the real app (its own pool and gates, with small sizes chosen per test) on a
database shared by the module, with tenants made once through the public API. Waiting is done on
conditions (the gates' own counters), never on time: `until()` polls a condition with a deadline.
The one timing figure (another tenant's list during a sign-in flood) is printed, not asserted;
bench/overload.py measures latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api_support import ApiWorld, build_world, fast_settings
from conftest import until
from iafactory.admission import ANONYMOUS, CpuWork, Gate
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.scope import Database, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): the application's own
# queues, gates and lanes under floods, in front of the database.
pytestmark = [pytest.mark.anyio, pytest.mark.server_independent]

API = "/api/v1"
REAL_ARGON2 = {
    name: Settings.model_fields[name].default
    for name in ("argon2_time_cost", "argon2_memory_cost_kib", "argon2_parallelism")
}


@pytest.fixture(scope="module")
async def world(module_api_client: tuple[httpx.AsyncClient, str, Settings]) -> ApiWorld:
    client, admin_url, settings = module_api_client
    return await build_world(client, admin_url, settings)


@asynccontextmanager
async def serving(admin_url: str, **overrides: Any) -> AsyncIterator[tuple[FastAPI, Database, httpx.AsyncClient]]:
    """The real app with these settings, its own pool, an in-process client."""
    settings = fast_settings(admin_url).model_copy(update=overrides)
    db = bootstrap.database(settings, admin_url)
    async with db:
        app = create_app(settings, db)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as client:
            try:
                yield app, db, client
            finally:
                app.state.load.close()


@asynccontextmanager
async def holding(db: Database, tenant: uuid.UUID, count: int) -> AsyncIterator[None]:
    """Hold `count` of the pool's connections as `tenant` (what slow requests of theirs would do)."""
    async with AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(db.tenant(TenantContext(tenant_id=tenant)))
        yield


@asynccontextmanager
async def frozen(cpu: CpuWork) -> AsyncIterator[None]:
    """Occupy every thread of a CPU pool until the block ends: work queued behind stays queued."""
    release = threading.Event()
    blockers = [asyncio.create_task(cpu.run(("test", i), release.wait)) for i in range(cpu.gate.slots)]
    await until(lambda: cpu.gate.active == cpu.gate.slots, "the pool's threads to be taken")
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*blockers)


def is_busy(r: httpx.Response) -> bool:
    body = r.json()
    return (
        r.status_code == 503
        and r.headers["content-type"] == "application/problem+json"
        and int(r.headers["retry-after"]) >= 1
        and body["type"].endswith("/busy")
        and body["detail"] == f"busy, retry after {r.headers['retry-after']} s"
    )


# --- sign-in flood -----------------------------------------------------------------------------------


async def test_a_sign_in_flood_hashes_with_no_connection_held_and_other_tenants_are_served(world: ApiWorld) -> None:
    flood_size = 60
    email = f"flood-{uuid.uuid4().hex[:8]}@example.ch"
    # A password hashed with the real argon2id parameters (64 MiB, 3 passes): verifying it costs what
    # it costs in production.
    real = fast_settings(world.admin_url).model_copy(update=REAL_ARGON2)
    async with operator_transaction(world.admin_url) as tx:
        await service.add_member(
            tx, world.a.slug, email, "viewer", password_hash=await hash_password(real, "pw-flood-1234")
        )
    async with serving(
        world.admin_url,
        **REAL_ARGON2,
        password_hash_concurrency=2,
        password_hash_max_waiting=flood_size,
        pool_max_waiting=4 * flood_size,
        tenant_max_waiting=2 * flood_size,
        anonymous_max_in_flight=2 * flood_size,
        queue_timeout_seconds=120,
    ) as (app, db, client):
        hashing = app.state.load.hashing

        def sign_in() -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                client.post(f"{API}/auth/login", json={"email": email, "password": "pw-flood-1234"})
            )

        # 1. Hashing frozen: every sign-in of the flood has read its hash and waits for a thread.
        async with frozen(hashing):
            flood = [sign_in() for _ in range(flood_size)]
            await until(lambda: hashing.gate.waiting + db.gate.waiting == flood_size, "the whole flood to be parked")
            assert db.checked_out == 0 and db.gate.active == 0, "a sign-in waiting for argon2 holds a connection"
            assert hashing.gate.waiting == flood_size
            stats = db.load_stats()["pool"]
            assert stats["size"] - stats["available"] == 0
            r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
            assert r.status_code == 200
            assert hashing.gate.waiting == flood_size  # served while the flood was still waiting
        # 2. The same flood, now hashing for real (two at a time): another tenant's list still
        #    completes before the flood does.
        await until(lambda: hashing.gate.active > 0, "hashing to start")
        started = time.perf_counter()
        r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
        took = time.perf_counter() - started
        still_hashing = hashing.gate.active + hashing.gate.waiting
        assert r.status_code == 200 and still_hashing > 0
        print(
            f"\nGET /projects of another tenant during a {flood_size}-sign-in flood: {took * 1000:.1f} ms "
            f"({still_hashing} sign-ins still hashing or queued)"
        )
        responses = await asyncio.gather(*flood)
    assert [r.status_code for r in responses] == [200] * flood_size
    assert hashing.gate.peak_active <= 2  # memory: at most two 64 MiB hashes at a time
    assert db.gate.peak_active <= 4  # sign-ins took connections only for their two short transactions


async def test_a_full_hashing_queue_refuses_sign_ins_at_once_without_reading_anything(world: ApiWorld) -> None:
    async with serving(
        world.admin_url, password_hash_concurrency=1, password_hash_max_waiting=2, queue_timeout_seconds=120
    ) as (app, db, client):
        hashing = app.state.load.hashing
        body = {"email": f"nobody-{uuid.uuid4().hex[:6]}@example.ch", "password": "whatever-123"}
        async with frozen(hashing):
            queued = [asyncio.create_task(client.post(f"{API}/auth/login", json=body)) for _ in range(2)]
            await until(lambda: hashing.gate.waiting == 2, "two sign-ins queued")
            admitted = db.gate.admitted
            r = await client.post(f"{API}/auth/login", json=body)
            assert is_busy(r), r.text
            assert db.gate.admitted == admitted  # refused before reading the password hash
            assert hashing.gate.waiting == 2
        assert [q.status_code for q in await asyncio.gather(*queued)] == [401, 401]  # unknown email


# --- the connection queue ------------------------------------------------------------------------------


async def test_a_full_connection_queue_answers_503_busy_with_retry_after_at_once(world: ApiWorld) -> None:
    async with serving(
        world.admin_url,
        pool_min_size=1,
        pool_max_size=2,
        pool_max_waiting=2,
        tenant_max_connections=2,
        tenant_max_waiting=2,
        queue_timeout_seconds=120,
    ) as (_app, db, client):
        async with holding(db, world.a.id, 2):
            queued = [
                asyncio.create_task(client.get(f"{API}/projects", headers=world.b.auth("viewer"))) for _ in range(2)
            ]
            await until(lambda: db.gate.waiting == 2, "two requests queued")
            r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
            assert is_busy(r), r.text
            assert db.gate.waiting == 2 and not any(q.done() for q in queued)  # answered at once
            assert db.gate.shed_full == 1
        assert [r.status_code for r in await asyncio.gather(*queued)] == [200, 200]


async def test_a_request_waiting_longer_than_the_queue_timeout_gets_503_busy(world: ApiWorld) -> None:
    async with (
        serving(world.admin_url, pool_min_size=1, pool_max_size=1, queue_timeout_seconds=0.2) as (
            _app,
            db,
            client,
        ),
        holding(db, world.a.id, 1),
    ):
        r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
        assert is_busy(r), r.text
        assert db.gate.shed_timeout == 1 and db.gate.waiting == 0


async def test_one_tenants_flood_leaves_connections_to_the_others(world: ApiWorld) -> None:
    async with serving(
        world.admin_url,
        pool_min_size=1,
        pool_max_size=4,
        pool_max_waiting=16,
        tenant_max_connections=2,
        tenant_max_waiting=3,
        queue_timeout_seconds=120,
    ) as (_app, db, client):
        async with holding(db, world.a.id, 2):  # tenant A at its cap
            flood = [
                asyncio.create_task(client.get(f"{API}/projects", headers=world.a.auth("viewer"))) for _ in range(3)
            ]
            await until(lambda: db.gate.waiting_for(world.a.id) == 3, "A's requests queued behind its cap")
            # A's share of the queue is full: refused at once, while B is served on the free slots.
            r = await client.get(f"{API}/projects", headers=world.a.auth("viewer"))
            assert is_busy(r), r.text
            others = await asyncio.gather(
                *(client.get(f"{API}/projects", headers=world.b.auth("viewer")) for _ in range(4))
            )
            assert [o.status_code for o in others] == [200] * 4
            assert db.gate.waiting_for(world.a.id) == 3 and not any(f.done() for f in flood)
        assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 3


async def test_beyond_the_requests_in_flight_a_process_answers_503_busy_but_health_probes_pass(world: ApiWorld) -> None:
    async with serving(
        world.admin_url, pool_min_size=1, pool_max_size=1, max_requests_in_flight=1, queue_timeout_seconds=120
    ) as (app, db, client):
        async with holding(db, world.a.id, 1):
            queued = asyncio.create_task(client.get(f"{API}/projects", headers=world.b.auth("viewer")))
            await until(lambda: db.gate.waiting == 1, "one request in flight")
            r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
            assert is_busy(r), r.text
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            assert app.state.load.stats()["http"]["shed"] == 1
        assert (await queued).status_code == 200


async def test_sign_ins_and_one_credential_have_lanes_refused_before_anything_is_parsed(world: ApiWorld) -> None:
    async with serving(
        world.admin_url,
        pool_min_size=1,
        pool_max_size=1,
        anonymous_max_in_flight=2,
        credential_max_in_flight=1,
        queue_timeout_seconds=120,
    ) as (app, db, client):
        hashing = app.state.load.hashing
        body = {"email": f"nobody-{uuid.uuid4().hex[:6]}@example.ch", "password": "whatever-123"}
        async with frozen(hashing):
            sign_ins = [asyncio.create_task(client.post(f"{API}/auth/login", json=body)) for _ in range(2)]
            await until(lambda: hashing.gate.waiting == 2, "two sign-ins in flight")
            admitted = db.gate.admitted
            r = await client.post(f"{API}/auth/login", content=b"not even JSON")
            http = app.state.load.http  # (the middleware exists once the app has served a request)
            assert is_busy(r) and http.shed_anonymous == 1  # refused before its body was read
            assert db.gate.admitted == admitted
        assert [r.status_code for r in await asyncio.gather(*sign_ins)] == [401, 401]
        async with holding(db, world.a.id, 1):
            queued = asyncio.create_task(client.get(f"{API}/projects", headers=world.b.auth("viewer")))
            await until(lambda: db.gate.waiting == 1, "one request of this token in flight")
            r = await client.get(f"{API}/projects", headers=world.b.auth("viewer"))
            assert is_busy(r) and http.shed_credential == 1
            # Another credential of the same tenant has a lane of its own.
            other = asyncio.create_task(client.get(f"{API}/projects", headers=world.b.key("read")))
            await until(lambda: db.gate.waiting == 2, "the other credential's request queued")
        assert [r.status_code for r in await asyncio.gather(queued, other)] == [200, 200]


# --- a client that went away ------------------------------------------------------------------------------


@asynccontextmanager
async def real_server(app: FastAPI) -> AsyncIterator[int]:
    """uvicorn on a free loopback port, in this event loop (a real socket, so a real disconnect)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def send_then_hang_up(
    port: int, method: str, path: str, token: str, body: dict[str, Any] | None, hang_up_when: Callable[[], bool]
) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    writer.write(head + payload)
    await writer.drain()
    await until(hang_up_when, "the request to be queued")
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_a_queued_request_whose_client_disconnected_never_reaches_the_database(world: ApiWorld) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    r = await world.client.post(f"{API}/projects", json={"name": "keep me"}, headers=world.b.auth("member"))
    kept = r.json()["id"]
    async with serving(world.admin_url, pool_min_size=1, pool_max_size=1, queue_timeout_seconds=120) as (app, db, _):
        gate = db.gate
        async with real_server(app) as port:
            async with holding(db, world.a.id, 1):
                admitted = gate.admitted
                # A write with a body, and a DELETE with none (its disconnect is seen without a body
                # to read first).
                await send_then_hang_up(
                    port,
                    "POST",
                    f"{API}/projects",
                    world.b.tokens["member"],
                    {"name": ghost},
                    lambda: gate.waiting == 1,
                )
                await until(lambda: gate.gone == 1 and gate.waiting == 0, "the first hang-up to empty the queue")
                await send_then_hang_up(
                    port, "DELETE", f"{API}/projects/{kept}", world.b.tokens["member"], None, lambda: gate.waiting == 1
                )
                await until(lambda: gate.gone == 2 and gate.waiting == 0, "the second hang-up to empty the queue")
            # The slot is free again: a request still queued would take it now. Both are finished.
            await until(lambda: app.state.load.http.in_flight == 0, "both requests to finish")
            assert gate.admitted == admitted
    async with operator_transaction(world.admin_url) as tx:
        names = {row["name"] for row in await tx.fetch("SELECT name FROM projects WHERE tenant_id = %s", (world.b.id,))}
    assert ghost not in names and "keep me" in names


# --- search ------------------------------------------------------------------------------------------------


async def test_a_search_embeds_its_query_with_no_connection_held(world: ApiWorld) -> None:
    async with serving(world.admin_url, embedding_concurrency=1, queue_timeout_seconds=120) as (app, db, client):
        embedding = app.state.load.embedding
        async with frozen(embedding):
            search = asyncio.create_task(
                client.post(
                    f"{API}/knowledge-base/search",
                    headers=world.a.auth("viewer"),
                    json={"query": "horaires d'ouverture", "mode": "hybrid"},
                )
            )
            await until(lambda: embedding.gate.waiting == 1, "the search to wait for the embedder")
            assert db.checked_out == 0 and db.gate.active == 0
        r = await search
        assert r.status_code == 200, r.text
        assert r.json()["embedding_model"] is not None


async def test_a_refused_search_costs_no_embedding(world: ApiWorld) -> None:
    """Authorization and the rate limit run before the query is embedded."""
    async with serving(world.admin_url) as (app, _db, client):
        platform = world.headers(world.platform_token)
        r = await client.patch(f"{API}/admin/tenants/{world.b.id}", json={"status": "suspended"}, headers=platform)
        assert r.status_code == 200, r.text
        try:
            r = await client.post(
                f"{API}/knowledge-base/search",
                headers=world.b.auth("viewer"),
                json={"query": "horaires", "mode": "semantic"},
            )
            assert r.status_code == 403, r.text
            assert app.state.load.embedding.gate.admitted == 0
        finally:
            r = await client.patch(f"{API}/admin/tenants/{world.b.id}", json={"status": "active"}, headers=platform)
            assert r.status_code == 200, r.text


# --- the gate itself -------------------------------------------------------------------------------------------


async def test_a_cancelled_waiter_that_was_handed_a_slot_hands_it_on() -> None:
    gate = Gate("t", 1, max_waiting=10, timeout=10)
    await gate.acquire("a")
    first = asyncio.create_task(gate.acquire("b"))
    second = asyncio.create_task(gate.acquire("c"))
    await until(lambda: gate.waiting == 2, "two waiters")
    gate.release("a")  # the slot goes to the first waiter ...
    first.cancel()  # ... which is cancelled before it runs: the slot must reach the second
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert gate.active == 1 and gate.active_for("c") == 1 and gate.active_for("b") == 0
    gate.release("c")
    assert gate.active == 0 and gate.waiting == 0


async def test_a_key_at_its_cap_does_not_block_the_keys_behind_it() -> None:
    gate = Gate("t", 2, max_waiting=10, timeout=10, key_slots=1, lanes={ANONYMOUS: 1})
    await gate.acquire("a")
    blocked = asyncio.create_task(gate.acquire("a"))  # a is at its cap: waits
    await until(lambda: gate.waiting == 1, "a's second request to wait")
    await gate.acquire("b")  # a free slot, and b is under its cap: served at once, not after a
    assert gate.active == 2 and not blocked.done()
    gate.release("a")
    await blocked
    assert gate.active_for("a") == 1
