"""Overload: a steady tenant's latency while other clients flood the service.

    python bench/overload.py [--seconds 10] [--rounds 2] [--rate 40] [--logins 64] [--searches 64]
                             [--slow 256] [--greedy] [--flood-nice 19] [--database-url URL] [--port P] [--keep]

1. Creates a throw-away database on the server (--database-url, else DATABASE_URL, else the
   embedded PostgreSQL), migrates it, and makes two tenants: "steady" (an owner, 300 projects)
   and "flood" (an owner whose password is hashed with the real argon2id parameters, 64 MiB and 3
   passes, and 40 knowledge-base documents). Both tenants' rate limits are raised: a 429 would be
   a cheap answer, not a result.
2. Starts `iafactory serve --no-migrate --workers 1` on 127.0.0.1 with its default settings (its
   own process group; it indexes the documents itself), and waits until they are indexed.
3. For each flood in turn, three stages of --seconds each: before (the steady tenant alone),
   during (with the flood), after (alone again: is the service back at once?); the whole sequence
   --rounds times, pooled. Throughout, the steady tenant sends GET /api/v1/projects?limit=20 at
   --rate per second, open loop: latency counts from the planned send time, so a stalled server
   is not hidden by a client that politely waits for it. The floods:
      logins        --logins clients signing in (right password) again as soon as answered
      searches      --searches clients searching the flood tenant's documents (hybrid)
      slow headers  --slow connections sending a request's headers one byte every 0.5 s
                    (slowloris; loopback only, bounded in count and time)
   Each flood client is a connection sending its next request as soon as the last is answered;
   refused (503), it waits the Retry-After it was given, as an HTTP client library would, unless
   --greedy: then it resends at once, a firehose of refusals whose cost (~0.15 ms of the event
   loop each) a single process cannot absorb without every other request waiting (that is for a
   proxy's per-client limits). The flood runs in a process of its own, on raw sockets (httpx
   would throttle it), at the lowest CPU priority (--flood-nice 19): it stands for other
   machines, and its CPU is printed too.
4. Prints each stage as it ends (the steady tenant's p50/p99/max and failures, the flood's answers
   (200, 503 = shed, others), CPU seconds of the server, PostgreSQL and the flood's client, the
   server's peak memory), then per flood, all rounds pooled, p50/p99 before, during and after,
   and the ratio of p99 during to p99 before (target: <= 3x).

The machine may be shared: run it twice, and read the figures with the load average it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

from _common import create_database, drop_database, free_port, percentile, server_url
from api import CpuMeter, log_tail, start_server, stop_server, wait_ready
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.scope import admin_connect, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

HOST = "127.0.0.1"
LIST_PATH = "/api/v1/projects?limit=20"
STEADY_PASSWORD = "steady-password-correct-horse"
FLOOD_PASSWORD = "flood-password-correct-horse"
NO_LIMITS = {"requests_per_minute": 1_000_000_000, "key_requests_per_minute": 1_000_000_000}
TARGET_RATIO = 3.0
QUERIES = [
    "horaires d'ouverture du cabinet",
    "procédure de facturation trimestrielle",
    "school enrolment deadline",
    "protection des données des patients",
    "contrat de travail à durée déterminée",
    "tax return documents",
]
TOPICS = ["horaires", "facturation", "inscription", "données", "contrat", "impôts", "rendez-vous", "archives"]


@dataclass
class World:
    steady_email: str
    flood_email: str
    flood_tenant: uuid.UUID
    steady_token: str = ""
    flood_token: str = ""


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, from the planned send time
    failures: Counter[str] = field(default_factory=Counter)
    flood: dict | None = None
    peak_rss_mib: float = 0.0
    load: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds: server, PostgreSQL, flood client

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")


# -- setup -------------------------------------------------------------------------------------------


async def create_world(admin: str) -> World:
    tag = uuid.uuid4().hex[:6]
    cheap = Settings(database_url=admin, argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1)
    real = Settings(database_url=admin)  # the production argon2id parameters
    steady_hash = await hash_password(cheap, STEADY_PASSWORD)
    flood_hash = await hash_password(real, FLOOD_PASSWORD)
    world = World(f"steady-{tag}@example.ch", f"flood-{tag}@example.ch", uuid.uuid4())
    async with operator_transaction(admin) as tx:
        for label, email, pw in (("steady", world.steady_email, steady_hash), ("flood", world.flood_email, flood_hash)):
            tenant = await service.create_tenant(
                tx,
                TenantCreate(name=f"Overload {label}", slug=f"{label}-{tag}", region="CH", plan="pro", status="active"),
            )
            await service.add_member(tx, tenant.slug, email, "owner", name=label, password_hash=pw)
            await tx.fetchrow("SELECT * FROM platform.tenant_set_limits(%s, %s)", (tenant.id, Jsonb(NO_LIMITS)))
            if label == "flood":
                world.flood_tenant = tenant.id
            else:
                steady_id = tenant.id
    async with await admin_connect(admin) as conn:
        await conn.execute(
            """INSERT INTO projects (tenant_id, name, description, status, settings, created_at, updated_at)
               SELECT %s, 'Project ' || g, 'Seeded by bench/overload.py', 'active', '{}'::jsonb,
                      now() - g * interval '1 minute', now() - g * interval '1 minute'
               FROM generate_series(1, 300) g""",
            (steady_id,),
        )
        await conn.execute("VACUUM ANALYZE projects")
    return world


async def seed_documents(base: str, world: World, count: int = 40) -> None:
    """Created through the API (their indexing is queued), then waited for."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        headers = {"Authorization": f"Bearer {world.flood_token}"}
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            content = "\n\n".join(
                f"## {topic.title()} {j}\n\nCe document décrit la procédure {topic} numéro {i}.{j} pour le cabinet, "
                f"les horaires, les responsables et les délais. This section explains {topic} step {j} in English too."
                for j in range(6)
            )
            r = await client.post(
                "/api/v1/knowledge-base", headers=headers, json={"title": f"Guide {topic} {i}", "content": content}
            )
            if r.status_code != 201:
                raise SystemExit(f"creating a document: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + 600
        while True:
            r = await client.get("/api/v1/knowledge-base?limit=100", headers=headers)
            items = r.json()["items"]
            if any(d.get("index_status") == "failed" for d in items):
                raise SystemExit("a document failed to index")
            pending = [d for d in items if d.get("index_status") != "indexed"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} documents still not indexed")
            await asyncio.sleep(0.5)


async def sign_in(base: str, email: str, password: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        r = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
        if r.status_code != 200 or r.json().get("tenant") is None:
            raise SystemExit(f"sign-in of {email}: {r.status_code} {r.text[:300]}")
        return r.json()["access_token"]


# -- the steady tenant ---------------------------------------------------------------------------------


async def steady(base: str, token: str, rate: float, seconds: float, phase: Phase) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one(planned: float) -> None:
            try:
                r = await client.get(LIST_PATH, headers=headers)
                if r.status_code != 200:
                    phase.failures[str(r.status_code)] += 1
            except httpx.HTTPError as err:
                phase.failures[type(err).__name__] += 1
            phase.latencies.append(time.monotonic() - planned)

        start = time.monotonic() + 0.05
        tasks = []
        for i in range(int(rate * seconds)):
            planned = start + i / rate
            delay = planned - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(planned)))
        await asyncio.gather(*tasks)


async def peak_rss(pgid: int, stop: asyncio.Event) -> float:
    """Peak resident memory (MiB) of a process group, sampled every 0.25 s."""
    page = os.sysconf("SC_PAGE_SIZE")
    peak = 0
    while not stop.is_set():
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[2]) != pgid:
                    continue
                total += int((entry / "statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        peak = max(peak, total)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    return peak / 2**20


# -- the flood (a process of its own: python bench/overload.py --flood KIND ...) --------------------------


async def flood(kind: str, base: str, seconds: float, concurrency: int, world: dict, greedy: bool) -> dict:
    """`concurrency` connections, each sending its next request as soon as the last is answered,
    or, answered 503 with Retry-After, after that long (unless `greedy`). A few lines of HTTP/1.1 on raw sockets rather than httpx: with hundreds of connections httpx
    spends ~15 ms of CPU per request, and the flood would be throttled by its own client."""
    if kind == "slow":
        return await slow_headers(base, seconds, concurrency)
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + seconds
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    def request(i: int, n: int) -> bytes:
        if kind == "logins":
            path, auth = "/api/v1/auth/login", ""
            body = json.dumps({"email": world["flood_email"], "password": FLOOD_PASSWORD})
        else:
            path, auth = "/api/v1/knowledge-base/search", f"Authorization: Bearer {world['flood_token']}\r\n"
            body = json.dumps({"query": f"{QUERIES[(i + n) % len(QUERIES)]} {n}", "k": 10})
        payload = body.encode()
        return (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

    async def loop(i: int) -> None:
        n, reader, writer = 0, None, None
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(request(i, n))
                status = int((await reader.readline()).split()[1])
                length, close, retry_after = 0, False, 0.0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    elif name.lower() == "connection" and value.strip().lower() == "close":
                        close = True
                    elif name.lower() == "retry-after":
                        retry_after = float(value)
                await reader.readexactly(length)
                codes[str(status)] += 1
                if close:
                    writer.close()
                    writer = None
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as err:
                codes[type(err).__name__] += 1
                if writer is not None:
                    writer.close()
                writer, retry_after = None, 0.0
            latencies.append(time.monotonic() - started)
            n += 1
            if retry_after and not greedy:
                await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    ok = sorted(latencies)
    return {
        "codes": dict(codes),
        "sent": len(latencies),
        "p50_ms": percentile(ok, 0.5) * 1000 if ok else None,
        "cpu": _own_cpu(),
    }


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def slow_headers(base: str, seconds: float, connections: int) -> dict:
    """Connections that send a request's headers one byte every 0.5 s: they hold a socket and a
    parser each, never a request. Loopback only."""
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + seconds
    outcome: Counter[str] = Counter()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            outcome["refused"] += 1
            return
        outcome["opened"] += 1
        try:
            writer.write(b"GET /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while time.monotonic() < deadline:
                writer.write(b"a")
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1024), 0.5)
                    if data or reader.at_eof():
                        outcome["answered or closed by the server"] += 1
                        return
                except TimeoutError:
                    continue
            outcome["still open at the end"] += 1
        except OSError:
            outcome["reset by the server"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return {"codes": dict(outcome), "sent": connections, "p50_ms": None, "cpu": _own_cpu()}


def start_flood(
    kind: str, base: str, seconds: float, concurrency: int, world: World, nice: int, greedy: bool
) -> subprocess.Popen:
    payload = json.dumps({"flood_email": world.flood_email, "flood_token": world.flood_token})
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--flood",
            kind,
            "--base",
            base,
            "--seconds",
            str(seconds),
            "--concurrency",
            str(concurrency),
            "--world",
            payload,
            *(["--greedy"] if greedy else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.nice(nice) if nice else None,
    )


# -- phases ------------------------------------------------------------------------------------------------


async def run_phase(
    name: str,
    kind: str | None,
    concurrency: int,
    args: argparse.Namespace,
    base: str,
    world: World,
    pgid: int,
    meter: CpuMeter,
) -> Phase:
    phase = Phase(name)
    stop = asyncio.Event()
    memory = asyncio.create_task(peak_rss(pgid, stop))
    before = meter.snapshot()
    proc = start_flood(kind, base, args.seconds + 1, concurrency, world, args.flood_nice, args.greedy) if kind else None
    if proc is not None:
        await asyncio.sleep(0.5)  # let the flood build up before measuring
    await steady(base, world.steady_token, args.rate, args.seconds, phase)
    if proc is not None:
        out, _ = await asyncio.to_thread(proc.communicate)
        phase.flood = json.loads(out.strip().splitlines()[-1])
    stop.set()
    phase.peak_rss_mib = await memory
    phase.load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    used = meter.delta(before, "server")
    phase.cpu = {
        "server": used["app"],
        "PostgreSQL": used.get("pg", float("nan")),
        "flood client": phase.flood.get("cpu", 0.0) if phase.flood else 0.0,
    }
    return phase


def show(phase: Phase) -> None:
    fails = ", ".join(f"{k} x{v}" for k, v in phase.failures.items()) or "none"
    line = (
        f"  {phase.name:<15} steady p50 {phase.ms(0.5):7.1f} ms  p99 {phase.ms(0.99):7.1f} ms  "
        f"max {phase.ms(1.0):7.1f} ms  n={len(phase.latencies)}  failures: {fails}  "
        f"server RSS peak {phase.peak_rss_mib:.0f} MiB  load {phase.load}"
    )
    print(line, flush=True)
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in phase.cpu.items())
    print(f"  {'':<15} CPU seconds: {cpu}", flush=True)
    if phase.flood:
        codes = phase.flood["codes"]
        shed = codes.get("503", 0)
        extra = f", flood p50 {phase.flood['p50_ms']:.0f} ms" if phase.flood.get("p50_ms") else ""
        print(f"  {'':<15} flood: {phase.flood['sent']} sent, answers {codes}, shed (503) {shed}{extra}", flush=True)


async def run(args: argparse.Namespace) -> None:
    url = server_url(args.database_url)
    name, admin = create_database(url, "overload")
    workdir = Path(tempfile.mkdtemp(prefix="iaf-overload-"))
    proc = None
    closers: list = []
    try:
        print(f"database {name}; migrating ...", flush=True)
        await bootstrap.migrate_and_prepare(admin, Settings(database_url=admin))
        world = await create_world(admin)
        port = args.port or free_port(HOST)
        base = f"http://{HOST}:{port}"
        env = {**os.environ, "DATABASE_URL": admin, "IAFACTORY_LOG_LEVEL": "WARNING", "IAFACTORY_RUN_WORKER": "true"}
        log_path = workdir / "server.log"
        proc = start_server(
            [
                str(Path(sys.executable).with_name("iafactory")),
                "serve",
                "--no-migrate",
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env,
            log_path,
        )
        async with httpx.AsyncClient(timeout=5) as probe:
            await wait_ready(probe, f"{base}/readyz", proc, log_path)
        world.steady_token = await sign_in(base, world.steady_email, STEADY_PASSWORD)
        world.flood_token = await sign_in(base, world.flood_email, FLOOD_PASSWORD)
        print("indexing the flood tenant's documents ...", flush=True)
        await seed_documents(base, world)
        print(
            f"{os.cpu_count()} CPUs, load {Path('/proc/loadavg').read_text().split()[:3]}; "
            f"steady tenant: GET {LIST_PATH} at {args.rate}/s, {args.seconds:.0f} s per phase",
            flush=True,
        )
        meter = CpuMeter(admin, {"server": proc.pid})
        closers.append(meter.close)
        await run_phase(
            "warm-up", None, 0, argparse.Namespace(**{**vars(args), "seconds": 3}), base, world, proc.pid, meter
        )
        floods = [("logins", args.logins), ("searches", args.searches), ("slow headers", args.slow)]
        kinds = {"logins": "logins", "searches": "searches", "slow headers": "slow"}
        # (flood, stage) -> the phases of every round, pooled
        pooled: dict[tuple[str, str], list[Phase]] = {}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}:", flush=True)
            for flood_name, concurrency in floods:
                for stage, kind in (("before", None), ("during", kinds[flood_name]), ("after", None)):
                    phase = await run_phase(
                        f"{stage} {flood_name}", kind, concurrency, args, base, world, proc.pid, meter
                    )
                    show(phase)
                    pooled.setdefault((flood_name, stage), []).append(phase)
                    if proc.poll() is not None:
                        raise SystemExit(f"the server died:\n{log_tail(log_path)}")
        print(
            f"\nsteady tenant, all rounds pooled ({args.rounds} x {args.seconds:.0f} s per stage); "
            f"target: p99 during a flood <= {TARGET_RATIO:.0f}x p99 before it"
        )
        print(
            f"  {'flood':<13} {'p50 before':>10} {'p99 before':>10} {'p50 during':>10} {'p99 during':>10} "
            f"{'p99 after':>10} {'ratio':>6}  shed (503) / flood requests"
        )
        failed = 0
        for flood_name, _ in floods:
            merged = {}
            for stage in ("before", "during", "after"):
                merged[stage] = Phase(stage, [x for ph in pooled[(flood_name, stage)] for x in ph.latencies])
                failed += sum(sum(ph.failures.values()) for ph in pooled[(flood_name, stage)])
            ratio = merged["during"].ms(0.99) / merged["before"].ms(0.99)
            floods_run = [ph.flood for ph in pooled[(flood_name, "during")] if ph.flood]
            shed = sum(f["codes"].get("503", 0) for f in floods_run)
            sent = sum(f["sent"] for f in floods_run)
            mark = "" if ratio <= TARGET_RATIO else "  !! over target"
            print(
                f"  {flood_name:<13} {merged['before'].ms(0.5):10.1f} {merged['before'].ms(0.99):10.1f} "
                f"{merged['during'].ms(0.5):10.1f} {merged['during'].ms(0.99):10.1f} "
                f"{merged['after'].ms(0.99):10.1f} {ratio:5.2f}x  {shed} / {sent}{mark}"
            )
        print(f"  (milliseconds; steady tenant's failed requests over all stages: {failed})")
    finally:
        for close in closers:
            close()
        if proc is not None:
            stop_server(proc)
        if not args.keep:
            drop_database(url, name)
        else:
            print(f"kept database {name}: {admin}")
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each stage")
    parser.add_argument("--rounds", type=int, default=2, help="times the whole sequence runs (pooled)")
    parser.add_argument("--rate", type=float, default=40.0, help="steady tenant's requests per second")
    parser.add_argument("--logins", type=int, default=64, help="concurrent sign-in clients")
    parser.add_argument("--searches", type=int, default=64, help="concurrent search clients")
    parser.add_argument("--slow", type=int, default=256, help="slow-header connections (at most 1000)")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="flood clients ignore Retry-After: each connection resends at once when refused",
    )
    parser.add_argument("--flood-nice", type=int, default=19, help="CPU niceness of the flood's clients (0: none)")
    parser.add_argument("--database-url")
    parser.add_argument("--port", type=int)
    parser.add_argument("--keep", action="store_true")
    # internal: run one flood in this process and print its result as JSON
    parser.add_argument("--flood", choices=("logins", "searches", "slow"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        if not args.base.startswith(f"http://{HOST}:"):
            raise SystemExit("floods are for loopback only")
        result = asyncio.run(
            flood(args.flood, args.base, args.seconds, min(args.concurrency, 1000), json.loads(args.world), args.greedy)
        )
        print(json.dumps(result))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
