"""Metering and credits throughput.

    python bench/metering.py [--batches 20] [--debits 2000] [--concurrency 16] [--database-url URL]

1. Usage-event ingestion in batches of 1,000 events: through the HTTP API (the real app in this
   process, httpx over ASGI, authentication and the tenant gate included) and straight into the
   database through the tenant scope (the same INSERT ... ON CONFLICT the service runs), so the
   ratio shows what the HTTP layer costs. Re-sending the same batches measures duplicate handling.
2. Concurrent credit debits (app.debit_credits: row lock, idempotency key, ledger row) against one
   tenant (every debit contends for the same account row) and spread over 100 tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_SECRETS, create_database, drop_database, server_url
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.scope import Database, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext
from iafactory.tenancy.schemas import TenantCreate

BATCH = 1000


def batch(tag: str, n: int) -> dict:
    return {
        "events": [
            {
                "event_type": ("llm.tokens", "voice.minutes", "rag.query")[i % 3],
                "quantity": 1 + i % 50,
                "idempotency_key": f"{tag}-{i}",
                "properties": {"model": "e5-small", "i": i},
            }
            for i in range(n)
        ]
    }


async def setup(admin: str, settings: Settings, tenants: int) -> tuple[list[uuid.UUID], str]:
    ids = []
    password = await hash_password(settings, "bench-password-123")
    async with operator_transaction(admin) as tx:
        for k in range(tenants):
            t = await service.create_tenant(
                tx, TenantCreate(name=f"Meter {k}", slug=f"meter-{k}", region="CH", plan="enterprise", status="active")
            )
            ids.append(t.id)
            await service.grant_credits(tx, t.id, 10**9, "bench", "bench")
            # No rate limit in the way of a throughput measurement.
            await service.set_limits(tx, t.id, {"requests_per_minute": 10**9, "key_requests_per_minute": 10**9})
        await service.add_member(tx, "meter-0", "meter@example.ch", "owner", password_hash=password)
    return ids, "meter@example.ch"


async def ingestion(db: Database, settings: Settings, tenant: uuid.UUID, email: str, batches: int) -> None:
    app = create_app(settings, db)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=120
    ) as client:
        token = (
            await client.post("/api/v1/auth/login", json={"email": email, "password": "bench-password-123"})
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        payloads = [batch(f"http-{b}", BATCH) for b in range(batches)]
        started = time.perf_counter()
        for body in payloads:
            r = await client.post("/api/v1/usage-events", json=body, headers=headers)
            assert r.status_code == 200 and len(r.json()["accepted"]) == BATCH, r.text[:300]
        http_rate = batches * BATCH / (time.perf_counter() - started)
        started = time.perf_counter()
        for body in payloads:
            r = await client.post("/api/v1/usage-events", json=body, headers=headers)
            assert r.status_code == 200 and len(r.json()["duplicates"]) == BATCH, r.text[:300]
        dup_rate = batches * BATCH / (time.perf_counter() - started)

    ctx = TenantContext(tenant_id=tenant)
    started = time.perf_counter()
    for b in range(batches):
        events = batch(f"db-{b}", BATCH)["events"]
        async with db.tenant(ctx) as tx:
            await tx.fetch(
                """INSERT INTO usage_events (tenant_id, event_type, quantity, idempotency_key, properties)
                   SELECT %s, e.event_type, e.quantity, e.idempotency_key, e.properties
                   FROM jsonb_to_recordset(%s::jsonb)
                        AS e(event_type text, quantity numeric, idempotency_key text, properties jsonb)
                   ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING idempotency_key""",
                (tenant, __import__("json").dumps(events)),
            )
    db_rate = batches * BATCH / (time.perf_counter() - started)
    print(f"\nUsage-event ingestion ({batches} batches of {BATCH}):")
    print(f"  HTTP API, new events        {http_rate:10.0f} events/s   ({http_rate / db_rate:.2f}x the direct path)")
    print(f"  HTTP API, all duplicates    {dup_rate:10.0f} events/s")
    print(f"  direct (tenant scope, SQL)  {db_rate:10.0f} events/s")


async def debits(db: Database, tenants: list[uuid.UUID], total: int, concurrency: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    run = uuid.uuid4().hex[:6]

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            ctx = TenantContext(tenant_id=tenants[i % len(tenants)])
            async with db.tenant(ctx) as tx:
                await tx.fetch("SELECT * FROM app.debit_credits(1, 'bench', %s)", (f"{run}-{i}",))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace) -> None:
    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_meter")
    settings = Settings(
        database_url=admin,
        **BENCH_SECRETS,
        pool_max_size=args.concurrency,
        argon2_time_cost=1,
        argon2_memory_cost_kib=1024,
        argon2_parallelism=1,
    )
    try:
        await bootstrap.migrate_and_prepare(admin, settings)
        tenants, email = await setup(admin, settings, 100)
        db = bootstrap.database(settings, admin)
        async with db:
            await ingestion(db, settings, tenants[0], email, args.batches)
            one = await debits(db, tenants[:1], args.debits, args.concurrency)
            spread = await debits(db, tenants, args.debits, args.concurrency)
        print(f"\nConcurrent credit debits ({args.debits} debits, {args.concurrency} concurrent transactions):")
        print(f"  one tenant (one account row)  {one:10.0f} debits/s")
        print(f"  spread over 100 tenants       {spread:10.0f} debits/s   ({spread / one:.2f}x)")
    finally:
        drop_database(url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--debits", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
