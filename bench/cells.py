"""Region cells (issue 12): the HTTP API through cell routing vs the same service with one cell.

    python bench/cells.py [--tenants 200] [--seconds 10] [--concurrency 16] [--projects 100]
                          [--rounds 5] [--warmup 2] [--max-requests N] [--client auto|wrk|httpx]
                          [--database-url URL] [--keep]

Throughput (`bench_throughput`):

1. Four throw-away databases on one server (--database-url, else DATABASE_URL, else the embedded
   PostgreSQL): `single`, one cell serving every region; and for the routed service the
   `directory` and two cells, `dz` (DZ) and `eu` (CH, FR, BE, CA), migrated by `iafactory migrate`
   with IAFACTORY_CELLS. The same N tenants (alternately DZ and CH, so the load alternates between
   the cells) are created in both setups, each with an owner and --projects seeded projects, and
   rate limits that count every request but never refuse one (as bench/api.py does). In the
   routed setup each tenant lives in the cell of its region; a second `iafactory migrate`
   registers them and their owners' login hashes in the directory.
2. Two `iafactory serve --no-migrate` processes on 127.0.0.1, one worker each: `single`
   (DATABASE_URL = single) and `cells` (DATABASE_URL = the directory, IAFACTORY_CELLS = dz, eu;
   a pool per cell plus the directory's). Each owner signs in on both and creates a write API key
   (the routed key names its cell in its prefix). Sanity checks: the routed /readyz lists the
   directory and both cells; both services answer the same list for the same tenant; a tenant's
   credential does not reach another tenant's project, in the same cell or across cells.
3. Load from this process: C requests in flight over the N tenants round-robin, for list
   (GET /api/v1/projects?limit=20), create (POST /api/v1/projects) and get by id, each with JWTs
   and with API keys, on both services; a warm-up pass, then --rounds rounds in which every
   variant runs back to back on both services in an order that alternates from round to round.
4. Prints req/s, p50/p99 and CPU per request (the server's processes, PostgreSQL's backends of
   its databases, the load generator) per variant, and routed / single for the same variant
   (target >= 0.95x). Any non-2xx answer fails the run. Servers are stopped and the databases
   dropped in all cases (unless --keep).

Load client: wrk (generated Lua scripts) when on PATH, else httpx; bench/api.py's, reused.

Moving a tenant (`bench_move`, `--only move`): a tenant with --move-rows rows spread over its
tables (projects, CRM leads, usage and audit events) moves from a DZ cell to a CH cell with
`iafactory tenants move`'s own code; prints the move's total time and how long the tenant was
read-only (the journal's frozen_at → unfrozen_at).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_SECRET_ENV, bench_settings, create_database, drop_database, free_port, server_url
from api import (
    LIST_PATH,
    NO_LIMITS,
    OPS,
    PASSWORD,
    HttpxClient,
    Slice,
    Tenant,
    Totals,
    WrkClient,
    expect,
    log_tail,
    start_server,
    stop_server,
    wait_ready,
)
from iafactory.auth import tokens
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.scope import admin_connect, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext
from iafactory.tenancy.schemas import TenantCreate

HOST = "127.0.0.1"
CREDENTIALS = ("jwt", "key")
SERVICES = ("cells", "single")
LABELS = {"jwt": "JWT", "key": "API key"}
TARGET_RATIO = 0.95
CELLS = {"dz": ("DZ",), "eu": ("CH", "FR", "BE", "CA")}


@dataclass
class Setup:
    """One service under test: its databases, its tenants (with their credentials there), its server."""

    name: str
    databases: dict[str, str]  # label -> admin URL
    env: dict[str, str]
    tenants: list[Tenant] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    base: str = ""
    log: Path | None = None


# -- setup -----------------------------------------------------------------------------------------


def region_of(k: int) -> str:
    return "DZ" if k % 2 == 0 else "CH"


def cell_of(region: str) -> str:
    return next(name for name, regions in CELLS.items() if region in regions)


async def create_tenants(admin: str, ks: list[int], tag: str, per_tenant: int, pw_hash: str) -> list[Tenant]:
    """Tenants number `ks` (slug, region and owner derived from k and `tag`) in the database behind
    `admin`, each with an owner, no effective rate limit and `per_tenant` seeded projects."""
    tenants: list[Tenant] = []
    async with operator_transaction(admin) as tx:
        for k in ks:
            slug = f"bench-{k}-{tag}"
            created = await service.create_tenant(
                tx,
                TenantCreate(name=f"Bench tenant {k}", slug=slug, region=region_of(k), plan="pro", status="active"),
            )
            email = f"owner-{k}-{tag}@example.ch"
            row = await service.add_member(tx, slug, email, "owner", name=f"Owner {k}", password_hash=pw_hash)
            await tx.fetchrow("SELECT * FROM platform.tenant_set_limits(%s, %s)", (created.id, Jsonb(NO_LIMITS)))
            tenants.append(Tenant(created.id, slug, email, row["user_id"]))
    async with await admin_connect(admin) as conn:
        await conn.execute(
            """INSERT INTO projects (tenant_id, name, description, status, settings, owner_id, created_at, updated_at)
               SELECT t.id, 'Project ' || g, 'Seeded by bench/cells.py',
                      CASE WHEN g %% 10 = 0 THEN 'archived' ELSE 'active' END,
                      jsonb_build_object('seq', g), t.owner,
                      now() - g * interval '1 minute', now() - g * interval '1 minute'
               FROM unnest(%s::uuid[], %s::int[]) AS t(id, owner), generate_series(1, %s) g""",
            ([t.id for t in tenants], [t.user_id for t in tenants], per_tenant),
        )
        rows = await (
            await conn.execute("SELECT tenant_id, array_agg(id ORDER BY id) AS ids FROM projects GROUP BY tenant_id")
        ).fetchall()
        await conn.execute("VACUUM ANALYZE projects")
    ids = {r["tenant_id"]: r["ids"] for r in rows}
    for t in tenants:
        t.project_ids = ids[t.id]
    return tenants


def region_of_tenant(setup: Setup, t: Tenant) -> str:
    return region_of(setup.tenants.index(t))


def iafactory_exe() -> str:
    return str(Path(sys.executable).with_name("iafactory"))


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([iafactory_exe(), *args], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"iafactory {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("DATABASE_URL", "IAFACTORY_CELLS", "IAFACTORY_APP_DATABASE_URL", "IAFACTORY_APP_DIRECT_DATABASE_URL")
    }
    env.update(BENCH_SECRET_ENV, IAFACTORY_LOG_LEVEL="WARNING")
    return env


async def prepare(url: str, count: int, per_tenant: int) -> tuple[Setup, Setup, list[tuple[str, str]]]:
    """Both setups, migrated and loaded with the same tenants; and (name, admin URL) of every
    database made, for dropping."""
    made: list[tuple[str, str]] = []

    def database(prefix: str) -> str:
        name, admin = create_database(url, prefix)
        made.append((name, admin))
        return admin

    single_url = database("iaf_bench_cells_single")
    routed = {"directory": database("iaf_bench_cells_dir"), **{c: database(f"iaf_bench_cells_{c}") for c in CELLS}}
    cells_json = json.dumps({c: {"url": routed[c], "regions": list(regions)} for c, regions in CELLS.items()})
    single = Setup("single", {"single": single_url}, {**base_env(), "DATABASE_URL": single_url})
    cells = Setup("cells", routed, {**base_env(), "DATABASE_URL": routed["directory"], "IAFACTORY_CELLS": cells_json})
    try:
        await bootstrap.migrate_and_prepare(single_url, bench_settings(single_url))
        cli(cells.env, "migrate")  # the directory, then each cell with the regions it serves
        tag = uuid.uuid4().hex[:6]
        # The hash carries its own argon2 parameters: cheap ones make the sign-ins quick; verifying
        # a password is not what this benchmark measures.
        cheap = Settings(database_url=url, argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1)
        pw_hash = await hash_password(cheap, PASSWORD)
        ks = list(range(count))
        single.tenants = await create_tenants(single_url, ks, tag, per_tenant, pw_hash)
        by_k: dict[int, Tenant] = {}
        for c in CELLS:
            mine = [k for k in ks if cell_of(region_of(k)) == c]
            for k, t in zip(mine, await create_tenants(routed[c], mine, tag, per_tenant, pw_hash), strict=True):
                by_k[k] = t
        cells.tenants = [by_k[k] for k in ks]  # the same order as `single`: DZ, CH, DZ, CH...
        out = cli(cells.env, "migrate")  # registers the cells' tenants and login hashes in the directory
        registered = sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("directory: "))
        if registered < count:
            raise SystemExit(f"the directory registered {registered} tenants, not {count}:\n{out}")
    except BaseException:
        for name, _ in made:
            drop_database(url, name)
        raise
    return cells, single, made


def start(setup: Setup, workdir: Path) -> None:
    port = free_port()
    setup.log = workdir / f"{setup.name}.log"
    cmd = [iafactory_exe(), "serve", "--no-migrate", "--host", HOST, "--port", str(port), "--workers", "1"]
    setup.proc = start_server(cmd, setup.env, setup.log)
    setup.base = f"http://{HOST}:{port}"


async def sign_in_and_check(cells: Setup, single: Setup) -> None:
    for setup in (cells, single):
        assert setup.proc is not None and setup.log is not None
        async with httpx.AsyncClient(base_url=setup.base, timeout=30) as client:
            await wait_ready(client, setup.base + "/readyz", setup.proc, setup.log)
            ready = (await client.get("/readyz")).json()
            expected = {"directory", "cell dz", "cell eu"} if setup is cells else {"database"}
            if set(ready["checks"]) != expected:
                raise SystemExit(f"{setup.name}: /readyz checks {ready['checks']}, expected {sorted(expected)}")
            for t in setup.tenants:
                body = expect(
                    await client.post("/api/v1/auth/login", json={"email": t.email, "password": PASSWORD}),
                    200,
                    f"{setup.name}: login",
                ).json()
                if body.get("tenant") is None:
                    raise SystemExit(f"{setup.name}: login of {t.email} selected no tenant: {body}")
                t.token = body["access_token"]
                t.key = expect(
                    await client.post(
                        "/api/v1/api-keys", json={"name": "bench write key", "scope": "write"}, headers=t.headers("jwt")
                    ),
                    201,
                    f"{setup.name}: create API key",
                ).json()["key"]
            if setup is cells and not all(f"_{cell_of(region_of(k))}_" in t.key for k, t in enumerate(setup.tenants)):
                raise SystemExit("a routed API key does not name its tenant's cell")
            # A tenant's credentials never reach another tenant's project of the same database...
            a = setup.tenants[0]
            other = next(t for t in setup.tenants[1:] if region_of_tenant(setup, t) == region_of_tenant(setup, a))
            foreign = next(i for i in a.project_ids if i not in other.project_ids)
            for target in CREDENTIALS:
                expect(
                    await client.get(f"/api/v1/projects/{foreign}", headers=other.headers(target)),
                    404,
                    f"{setup.name}: another tenant's project ({LABELS[target]})",
                )
            if setup is cells:
                # ... and a token whose cell claim disagrees with the directory is refused (ids are
                # per cell: the DZ tenant's project 1 and the CH tenant's project 1 are both "1").
                forged, _ = tokens.issue(
                    bench_settings(setup.databases["directory"]), a.user_id, tenant_id=a.id, role="owner", cell="eu"
                )
                expect(
                    await client.get(LIST_PATH, headers={"Authorization": f"Bearer {forged}"}),
                    401,
                    "a DZ tenant's token claiming cell eu",
                )
    # Same data, same answer (ids and dates aside: each database numbers and dates its own rows).
    for k in (0, 1):
        answers = []
        for setup in (cells, single):
            async with httpx.AsyncClient(base_url=setup.base, timeout=30) as client:
                rows = expect(await client.get(LIST_PATH, headers=setup.tenants[k].headers("key")), 200, "list").json()
            answers.append([(r["name"], r["status"], r["settings"]) for r in rows["items"]])
        if answers[0] != answers[1] or not answers[0]:
            raise SystemExit(f"tenant {k}: the routed and single answers differ:\n{answers}")


# -- CPU accounting --------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_cpu(pgid: int) -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Meter:
    """CPU seconds of a service: its server's process group, and the PostgreSQL backends connected
    to its databases (when the server runs on this machine); and of the load generator."""

    def __init__(self, monitor_url: str) -> None:
        self.conn = psycopg.connect(monitor_url, autocommit=True)
        pid = self.conn.info.backend_pid
        try:
            self.pg_visible = b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            self.pg_visible = False

    def snapshot(self, setup: Setup) -> dict[str, object]:
        assert setup.proc is not None
        names = [conninfo_to_dict(u).get("dbname") for u in setup.databases.values()]
        pg: dict[int, float] = {}
        if self.pg_visible:
            for (pid,) in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", (names,)
            ).fetchall():
                if (cpu := _proc_cpu(pid)) is not None:
                    pg[pid] = cpu
        own = os.times()
        return {
            "app": _group_cpu(setup.proc.pid),
            "pg": pg,
            "client": own.user + own.system + own.children_user + own.children_system,
        }

    def delta(self, setup: Setup, before: dict) -> dict[str, float]:
        after = self.snapshot(setup)
        out = {"app": after["app"] - before["app"], "client": after["client"] - before["client"]}  # type: ignore[operator]
        if self.pg_visible:
            out["pg"] = sum(cpu - before["pg"].get(pid, 0.0) for pid, cpu in after["pg"].items())  # type: ignore[union-attr]
        return out

    def close(self) -> None:
        self.conn.close()


# -- throughput ------------------------------------------------------------------------------------


def header(args: argparse.Namespace, url: str, client_name: str, cells: Setup, single: Setup) -> None:
    settings = Settings()
    with psycopg.connect(url) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    cores = os.cpu_count()
    print(f"""
Region cells: routed (2 cells + directory) vs one cell
  machine      {cores} cores ({platform.machine()}), Python {platform.python_version()}, PostgreSQL {pg}, load average {os.getloadavg()[0]:.2f} at start
               NOTE: the load generator, both servers and PostgreSQL share these {cores} cores; the figures
               compare the two services on equal terms, they are not capacity.
  cells        {cells.base}  iafactory serve --workers 1, IAFACTORY_CELLS dz (DZ) + eu (CH, FR, BE, CA), directory on DATABASE_URL
               (a pool per cell, {settings.pool_min_size}-{settings.pool_max_size} connections each, and the directory's)
  single       {single.base}  iafactory serve --workers 1, one database serving every region (one pool, {settings.pool_min_size}-{settings.pool_max_size})
  load         {client_name}, {args.concurrency} in flight, {args.tenants} tenants round-robin (alternately DZ and CH:
               consecutive requests alternate between the cells), {args.projects} seeded projects each
  timing       warm-up {args.warmup} s per variant, then {args.rounds} rounds x {args.seconds // args.rounds} s per variant, interleaved
""")


def report(results: dict[tuple[str, str, str], Totals], args: argparse.Namespace) -> list[str]:
    print(
        f"\nResults ({args.rounds} rounds x {args.seconds // args.rounds} s per variant, "
        f"{args.concurrency} in flight, {args.tenants} tenants):"
    )
    print(
        f"  {'operation':<10}{'credential':<11}{'service':<8}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cells/single':>14}{'rounds req/s min-max':>23}{'errors':>8}{'CPU ms/req: app':>17}{'PG':>7}{'load':>7}"
    )
    below = []
    for op in OPS:
        for cred in CREDENTIALS:
            base = results[(op, cred, "single")].rate
            for svc in SERVICES:
                r = results[(op, cred, svc)]
                rates = [s.rate for s in r.slices]
                ratio = f"{r.rate / base:>13.3f}x" if svc == "cells" and base else f"{'':>14}"
                print(
                    f"  {op:<10}{LABELS[cred]:<11}{svc:<8}{r.requests:>10}{r.rate:>9.0f}{r.percentile_ms(0.5):>9.2f}"
                    f"{r.percentile_ms(0.99):>9.2f}{ratio}{min(rates):>11.0f} - {max(rates):<9.0f}{r.errors:>8}"
                    f"{r.cpu_ms('app'):>17.2f}{r.cpu_ms('pg'):>7.2f}{r.cpu_ms('client'):>7.2f}"
                )
            ratio = results[(op, cred, "cells")].rate / base if base else float("nan")
            if ratio < TARGET_RATIO:
                below.append(f"{op} / {LABELS[cred]} {ratio:.3f}x")
    cells_all = sum(results[k].requests for k in results if k[2] == "cells")
    single_all = sum(results[k].requests for k in results if k[2] == "single")
    print(f"  all variants: cells / single = {cells_all / single_all:.3f}x (requests in equal time)")
    # Wall-clock rates move with whatever else the machine runs; CPU per request much less.
    cpu = [
        f"{op}/{LABELS[cred]} {results[(op, cred, 'single')].cpu_ms('app') / results[(op, cred, 'cells')].cpu_ms('app'):.3f}x"
        for op in OPS
        for cred in CREDENTIALS
    ]
    print("  app CPU per request, single / cells (capacity ratio of the server process): " + ", ".join(cpu))
    print(f"  (load average at the end: {os.getloadavg()[0]:.2f})")
    print(
        f"\nTarget: cells >= {TARGET_RATIO:.2f}x single for the same operation and credential: "
        + ("met by every variant" if not below else "NOT met by " + ", ".join(below))
    )
    return below


def bench_throughput(args: argparse.Namespace) -> int:
    """List / get / create through cell routing vs one cell. Returns the number of failed requests."""
    url = server_url(args.database_url)
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    print(f"Databases: migrating, {args.tenants} tenants x {args.projects} projects in each setup ...", flush=True)
    started = time.monotonic()
    cells, single, made = asyncio.run(prepare(url, args.tenants, args.projects))
    print(f"  ready in {time.monotonic() - started:.1f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="iaf-bench-cells-"))
    meter: Meter | None = None
    errors = 0
    try:
        for setup in (cells, single):
            start(setup, workdir)
        asyncio.run(sign_in_and_check(cells, single))
        clients: dict[str, WrkClient | HttpxClient] = {}
        for setup in (cells, single):
            (workdir / setup.name).mkdir()
            clients[setup.name] = (
                WrkClient(workdir / setup.name, args.concurrency, args.max_requests)
                if use_wrk
                else HttpxClient(args.concurrency, args.max_requests)
            )
            for op in OPS:
                for cred in CREDENTIALS:
                    clients[setup.name].prepare(op, cred, setup.tenants)
        client_name = "wrk -t1 (C, Lua scripts generated per variant)" if use_wrk else "httpx.AsyncClient (Python)"
        header(args, url, client_name, cells, single)
        meter = Meter(url)
        setups = {"cells": cells, "single": single}

        def run(svc: str, op: str, cred: str, seconds: int) -> Slice:
            nonlocal errors
            setup = setups[svc]
            before = meter.snapshot(setup) if meter else {}
            s = clients[svc].run(setup.base, op, cred, setup.tenants, seconds)
            if meter:
                s.cpu = meter.delta(setup, before)
            if s.bad or s.socket_errors:
                errors += s.bad + s.socket_errors
                print(
                    f"  !! {svc} {op} / {LABELS[cred]}: {s.bad} non-2xx, {s.socket_errors} socket errors; first: {s.first_error}"
                )
            for other in (cells, single):
                assert other.proc is not None and other.log is not None
                if other.proc.poll() is not None:
                    raise SystemExit(f"server {other.name} died ({other.proc.returncode}):\n{log_tail(other.log)}")
            return s

        if args.warmup > 0:
            print("Warm-up:")
            for op in OPS:
                for cred in CREDENTIALS:
                    rates = {svc: run(svc, op, cred, args.warmup).rate for svc in SERVICES}
                    print(
                        f"  {op:<8}{LABELS[cred]:<9}" + "  ".join(f"{svc} {r:.0f} req/s" for svc, r in rates.items()),
                        flush=True,
                    )
        results = {(op, cred, svc): Totals() for op in OPS for cred in CREDENTIALS for svc in SERVICES}
        slice_seconds = max(1, args.seconds // args.rounds)
        print("Measured rounds:")
        for rnd in range(args.rounds):
            order = SERVICES if rnd % 2 == 0 else SERVICES[::-1]
            line = []
            for op in OPS:
                for cred in CREDENTIALS:
                    for svc in order:
                        s = run(svc, op, cred, slice_seconds)
                        results[(op, cred, svc)].slices.append(s)
                        line.append(f"{op}/{cred}/{svc} {s.rate:.0f}")
            print(f"  round {rnd + 1}/{args.rounds}: " + ", ".join(line), flush=True)
        report(results, args)
    finally:
        if meter is not None:
            meter.close()
        for setup in (cells, single):
            if setup.proc is not None:
                stop_server(setup.proc)
        if args.keep:
            print("kept databases: " + ", ".join(admin for _, admin in made))
        else:
            for name, _ in made:
                drop_database(url, name)
        shutil.rmtree(workdir, ignore_errors=True)
    return errors


# --- Moving a tenant (`bench_move`) ----------------------------------------------------------
MOVE_SLUG = "bench-move"


def _move_cli(urls: dict[str, str], cells: str, *args: str) -> None:
    exe = Path(sys.executable).with_name("iafactory")
    env = {**os.environ, **BENCH_SECRET_ENV, "DATABASE_URL": urls["directory"], "IAFACTORY_CELLS": cells}
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"iafactory {' '.join(args)}: {done.stderr.strip()}")


async def _fill(dz: str, rows: int) -> str:
    """ROWS rows for the tenant, as the owner in bulk mode (no plan limit, no debit)."""
    async with operator_transaction(dz) as tx:
        tenant_id = await tx.fetchval("SELECT id FROM tenants WHERE slug = %s", (MOVE_SLUG,))
    share = {"projects": rows // 5, "crm_leads": rows // 5, "usage_events": rows * 2 // 5}
    share["audit_events"] = rows - sum(share.values())
    async with operator_transaction(dz, TenantContext(tenant_id=tenant_id), bulk=True) as tx:
        await tx.execute(
            "INSERT INTO projects (tenant_id, name, description) "
            "SELECT %s, 'project ' || g, repeat('x', 100) FROM generate_series(1, %s) g",
            (tenant_id, share["projects"]),
        )
        await tx.execute(
            "INSERT INTO crm_leads (tenant_id, full_name, email, company) "
            "SELECT %s, 'Lead ' || g, 'lead' || g || '@example.dz', 'Société ' || g FROM generate_series(1, %s) g",
            (tenant_id, share["crm_leads"]),
        )
        await tx.execute(
            "INSERT INTO usage_events (tenant_id, event_type, quantity, idempotency_key, properties) "
            "SELECT %s, 'api.call', 1, 'k' || g, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
            (tenant_id, share["usage_events"]),
        )
        await tx.execute(
            "INSERT INTO audit_events (tenant_id, action, details) "
            "SELECT %s, 'bench.event', jsonb_build_object('n', g) FROM generate_series(1, %s) g",
            (tenant_id, share["audit_events"]),
        )
    return str(tenant_id)


def bench_move(database_url: str | None = None, rows: int = 100_000) -> dict[str, Any]:
    """Move time and write-freeze duration for a tenant with `rows` rows; prints and returns them."""
    from iafactory.cells.move import move_tenant

    url = server_url(database_url)
    names: dict[str, str] = {}
    urls: dict[str, str] = {}
    for role in ("directory", "dz", "eu"):
        names[role], urls[role] = create_database(url, f"bench_cells_{role}")
    cells = json.dumps(
        {"dz": {"url": urls["dz"], "regions": ["DZ"]}, "eu": {"url": urls["eu"], "regions": ["CH", "FR", "BE", "CA"]}}
    )
    try:
        _move_cli(urls, cells, "migrate")
        _move_cli(
            urls, cells, "tenants", "create", "--name", "Bench", "--slug", MOVE_SLUG, "--region", "DZ", "--plan", "pro"
        )
        asyncio.run(_fill(urls["dz"], rows))
        settings = bench_settings(urls["directory"], cells=cells)
        started = time.perf_counter()
        move = asyncio.run(move_tenant(settings, MOVE_SLUG, "CH", say=lambda _: None))
        total = time.perf_counter() - started
        frozen = (move.unfrozen_at - move.frozen_at).total_seconds()
        moved = sum(t["rows"] for t in move.checksums["target"].values())
        print(
            f"move of a tenant with {moved} rows (DZ cell → CH cell): {total:.2f} s; writes refused for {frozen:.2f} s"
        )
        return {"rows": moved, "move_seconds": total, "freeze_seconds": frozen}
    finally:
        for name in names.values():
            drop_database(url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per variant, over all rounds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--projects", type=int, default=100, help="seeded projects per tenant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="seconds per variant before measuring")
    parser.add_argument("--max-requests", type=int, default=500_000, help="cap on requests per slice")
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    parser.add_argument(
        "--only", choices=("all", "throughput", "move"), default="all", help="run one of the benchmarks"
    )
    parser.add_argument("--move-rows", type=int, default=100_000, help="rows of the moved tenant (bench_move)")
    args = parser.parse_args()
    if args.only == "move":
        bench_move(args.database_url, args.move_rows)
        return
    if args.tenants < 3 or args.projects < 2 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--tenants >= 3, --projects >= 2, --concurrency and --rounds >= 1")
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), or use --client httpx")
    args.rounds = min(args.rounds, max(1, args.seconds))  # whole seconds per slice (wrk's unit)
    errors = bench_throughput(args)
    if args.only == "all":
        bench_move(args.database_url, args.move_rows)
    if errors:
        raise SystemExit(f"FAILED: {errors} failed requests (non-2xx or socket errors), see the lines marked !!")


if __name__ == "__main__":
    main()
