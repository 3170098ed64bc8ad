"""Does the time of POST /api/v1/auth/register tell whether an email has an account?

    python bench/registration.py [--rounds 40] [--database-url URL] [--keep]

The real app in process (httpx over ASGI, the production argon2id parameters unless --cheap), on a
throw-away migrated database. Each round registers one new address (unknown: an account, a
verification token and an email are written) and one address that has an account (known: an email
is queued, nothing else changes), in alternating order so that neither always goes first. Prints
the median and p90 of each, and the known/unknown ratio (1.00 = indistinguishable by the median).
Every request counts against its email's own throttle counter, so the known addresses are spread
over many accounts (5 registrations free per address and hour).
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
from _common import bench_settings, create_database, drop_database, median, percentile, server_url
from iafactory.app import create_app
from iafactory.db import bootstrap

PASSWORD = "correct horse battery staple"


async def run(admin: str, rounds: int, cheap: bool) -> None:
    overrides = {"argon2_time_cost": 1, "argon2_memory_cost_kib": 1024, "argon2_parallelism": 1} if cheap else {}
    settings = bench_settings(admin, **overrides)
    await bootstrap.migrate_and_prepare(admin, settings)
    db = bootstrap.database(settings, admin)
    async with db:
        app = create_app(settings, db)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                tag = uuid.uuid4().hex[:6]
                known = [f"known-{k}-{tag}@example.ch" for k in range(rounds)]
                for email in known:  # the accounts that exist (not timed)
                    r = await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
                    assert r.status_code == 202, r.text
                times: dict[str, list[float]] = {"unknown": [], "known": []}
                for k in range(rounds):
                    order = [("unknown", f"new-{k}-{tag}@example.ch"), ("known", known[k])]
                    for kind, email in order if k % 2 == 0 else reversed(order):
                        started = time.perf_counter()
                        r = await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
                        times[kind].append((time.perf_counter() - started) * 1000)
                        assert r.status_code == 202, r.text
        finally:
            app.state.load.close()
    print(f"register, {rounds} rounds, argon2id {'test-sized' if cheap else 'production'} parameters")
    for kind, values in times.items():
        print(f"  {kind:8} median {median(values):7.2f} ms   p90 {percentile(values, 0.9):7.2f} ms")
    ratio = median(times["known"]) / median(times["unknown"])
    print(f"  known/unknown median ratio: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--database-url")
    parser.add_argument("--cheap", action="store_true", help="test-sized argon2id parameters")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()
    url = server_url(args.database_url)
    name, admin = create_database(url, "bench_register")
    try:
        asyncio.run(run(admin, args.rounds, args.cheap))
    finally:
        if not args.keep:
            drop_database(url, name)


if __name__ == "__main__":
    main()
