"""Request latency of the real service on several databases side by side (e.g. one PostgreSQL and
a Citus cluster distributed by `iafactory citus distribute`).

    python bench/distributed.py --database-url URL [--database-url URL ...] [--requests 400]
                                [--rounds 8] [--projects 50]

For each admin URL (a database already migrated, and distributed when it is Citus): makes a tenant
with an owner (operator path), starts `iafactory serve --no-migrate` on it, signs in and creates
--projects projects over HTTP. Then, in --rounds rounds that visit every server in turn (so that
the load of a shared machine weighs on all alike), sends --requests sequential requests per server
and operation: list (GET /api/v1/projects?limit=20) and get by id (GET /api/v1/projects/{id}).
Prints median and p95 per server and operation, and, on Citus, how many shards the list and the
get reach (EXPLAIN: Task Count). Servers are stopped in all cases; the tenants stay (bench-*).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_SECRET_ENV, bench_settings, free_port, median, percentile
from iafactory.auth.passwords import hash_password
from iafactory.db import server
from iafactory.db.bootstrap import migrate_and_prepare
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

PASSWORD = "bench-distributed-password"


async def prepare(admin: str) -> tuple[str, str]:
    """A tenant with an owner on this database: (slug, owner email)."""
    settings = bench_settings(admin)
    await migrate_and_prepare(admin, settings)
    tag = uuid.uuid4().hex[:8]
    slug, email = f"bench-{tag}", f"owner-{tag}@example.ch"
    async with operator_transaction(admin) as tx:
        tenant = await service.create_tenant(
            tx, TenantCreate(name=f"Bench {tag}", slug=slug, region="CH", plan="enterprise", status="active")
        )
        await service.set_limits(
            tx, tenant.id, {"requests_per_minute": 1_000_000, "key_requests_per_minute": 1_000_000}
        )
        await service.add_member(
            tx, slug, email, "owner", name="Owner", password_hash=await hash_password(settings, PASSWORD)
        )
    return slug, email


def start(admin: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        **BENCH_SECRET_ENV,
        "DATABASE_URL": admin,
        "IAFACTORY_LOG_LEVEL": "WARNING",
        "IAFACTORY_RUN_WORKER": "false",
    }
    exe = Path(sys.executable).with_name("iafactory")
    return subprocess.Popen(
        [str(exe), "serve", "--no-migrate", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("serve did not become ready")


def shards_reached(admin: str, tenant_id: str, project_id: int) -> dict[str, int] | None:
    """Task Count of the list and the get, as the application role (None: not Citus)."""
    with psycopg.connect(admin) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone() is None:
            return None
    app = server.app_conninfo(bench_settings(admin), admin)
    out = {}
    with psycopg.connect(app) as conn:
        for name, query, params in (
            (
                "list",
                "SELECT * FROM projects WHERE tenant_id = %s ORDER BY created_at DESC, id DESC LIMIT 21",
                (tenant_id,),
            ),
            ("get", "SELECT * FROM projects WHERE tenant_id = %s AND id = %s", (tenant_id, project_id)),
        ):
            plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}", params))
            out[name] = int(re.search(r"Task Count: (\d+)", plan).group(1))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", action="append", required=True)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--projects", type=int, default=50)
    args = parser.parse_args()

    targets = []
    procs = []
    try:
        for admin in args.database_url:
            _, email = await prepare(admin)
            port = free_port()
            procs.append(start(admin, port))
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
            await wait_ready(client, procs[-1])
            r = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
            r.raise_for_status()
            headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
            ids = []
            for i in range(args.projects):
                r = await client.post("/api/v1/projects", json={"name": f"Projet {i}"}, headers=headers)
                r.raise_for_status()
                ids.append(r.json()["id"])
            tenant_id = (await client.get("/api/v1/tenant", headers=headers)).json()["id"]
            label = server.redact(admin)
            targets.append(
                {
                    "label": label,
                    "client": client,
                    "headers": headers,
                    "ids": ids,
                    "admin": admin,
                    "tenant": tenant_id,
                    "list": [],
                    "get": [],
                }
            )

        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for t in targets:
                for op in ("list", "get"):
                    for _ in range(per_round):
                        path = (
                            "/api/v1/projects?limit=20"
                            if op == "list"
                            else f"/api/v1/projects/{random.choice(t['ids'])}"
                        )
                        started = time.perf_counter()
                        r = await t["client"].get(path, headers=t["headers"])
                        elapsed = (time.perf_counter() - started) * 1000
                        if r.status_code != 200:
                            raise SystemExit(f"{t['label']} {path}: {r.status_code} {r.text}")
                        t[op].append(elapsed)
        print(f"{'database':50} {'op':5} {'n':>5} {'median ms':>10} {'p95 ms':>8}  shards")
        for t in targets:
            shards = shards_reached(t["admin"], t["tenant"], t["ids"][0])
            for op in ("list", "get"):
                print(
                    f"{t['label'][:50]:50} {op:5} {len(t[op]):5} {median(t[op]):10.2f} {percentile(t[op], 0.95):8.2f}"
                    f"  {shards[op] if shards else '-'}"
                )
    finally:
        for t in targets:
            await t["client"].aclose()
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    asyncio.run(main())
