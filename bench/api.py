"""End to end: the real HTTP service against a bare FastAPI baseline, under load, on loopback.

    python bench/api.py [--tenants 20] [--seconds 10] [--concurrency 16] [--workers 1]
                        [--database-url URL] [--port P] [--projects 300] [--rounds 5] [--warmup 2]
                        [--client auto|wrk|httpx] [--max-requests N] [--profile DIR] [--keep]
                        [--pgbouncer [--pgbouncer-pool-size 5]]

1. Creates a throw-away database on the server (--database-url, else DATABASE_URL, else the
   embedded PostgreSQL), migrates it (bootstrap.migrate_and_prepare), creates N tenants each with
   an owner, and seeds --projects projects per tenant so that lists page through real data. Each
   tenant's rate limits are raised (platform.tenant_set_limits): the counter still runs on every
   request, as in production, but never answers 429.
2. Starts two servers on 127.0.0.1, each in a process (group) of its own:
     real  `iafactory serve --no-migrate --workers W`, DATABASE_URL = that database,
           IAFACTORY_LOG_LEVEL=WARNING (port --port, else a free one)
     bare  bench/api_bare.py, served by uvicorn with the same options: same framework, driver,
           models and SQL, but the tenant comes from an X-Tenant-Id header; no authentication, no
           RLS, no tenant scope (port --port + 1, else a free one)
   Each owner then signs in (POST /api/v1/auth/login) and creates a write API key
   (POST /api/v1/api-keys), and a sanity check compares the real and bare answers.
3. Load, from this process (neither server's): C requests in flight over the N tenants
   round-robin, for list (GET /api/v1/projects?limit=20), create (POST /api/v1/projects) and get
   by id (GET /api/v1/projects/{id}), each against the real service with JWTs and with API keys,
   and against the bare app. A warm-up pass runs every variant first; then --rounds rounds, each
   running every operation's three variants back to back (--seconds / --rounds seconds each) in
   an order that rotates from round to round, so drift affects all three alike. Every slice is
   bounded in time and in count (--max-requests).
4. Prints req/s, p50 and p99 per variant and req/s against the bare app for the same operation
   (target for the product: >= 0.8x, issue 11). Any non-2xx answer or socket error fails the run (exit 1).
   Both servers are stopped and the database dropped in all cases (unless --keep).

--pgbouncer: both servers reach PostgreSQL through one PgBouncer in transaction mode
(scripts/pgbouncer.py; --pgbouncer-pool-size server connections per database and user, fewer than
the apps' pools): the real one as IAFACTORY_APP_DATABASE_URL (no prepared statements: "auto"), the
bare one without psycopg's automatic prepared statements (PgBouncer 1.18 tracks none). Its CPU is
reported as a column of its own.

Load client: wrk, with Lua scripts generated here (`apt-get install wrk`), when it is on PATH;
else httpx.AsyncClient with a pool of C connections, which spends far more CPU per request than
the C client: on a small machine its figures are bounded by the client as much as by the servers.

Sessions (--auth-seconds S, default 5; 0 skips): sign-in and refresh throughput, from httpx, with
one sign-in in flight per core (more only queue in the bounded hashing pool, which answers 503
beyond it) and --concurrency refreshes in flight. Sign-in: POST /api/v1/auth/login for users whose hash has the
service's own argon2id parameters (the defaults: t=3, 64 MiB, p=4), so each one verifies a real
hash. Refresh: POST /api/v1/auth/refresh, each in-flight loop spending its own session's token and
keeping the next (a token is good for one use). A refresh is a hash lookup, a row update and a JWT;
it should cost a small fraction of a sign-in.

--profile DIR: after the measured rounds, records each server with py-spy (`pip install py-spy`)
during one more slice of every variant: DIR/<op>-<jwt|key|bare>.txt (collapsed stacks), and prints
where the time goes (inclusive share of our functions, self share of all).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_SECRET_ENV, bench_settings, create_database, drop_database, free_port, server_url
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap, server
from iafactory.db.scope import admin_connect, operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HOST = "127.0.0.1"
PASSWORD = "bench-password-correct-horse"
OPS = ("list", "create", "get")
TARGETS = ("jwt", "key", "bare")
LABELS = {"jwt": "real, JWT", "key": "real, API key", "bare": "bare"}
LIST_PATH = "/api/v1/projects?limit=20"
CREATE_BODY = json.dumps(
    {"name": "Bench project", "description": "created by bench/api.py", "settings": {"source": "bench", "n": 1}},
    separators=(",", ":"),
)
TARGET_RATIO = 0.8
NO_LIMITS = {"requests_per_minute": 1_000_000_000, "key_requests_per_minute": 1_000_000_000}


@dataclass
class Tenant:
    id: uuid.UUID
    slug: str
    email: str
    user_id: int
    project_ids: list[int] = field(default_factory=list)
    token: str = ""
    key: str = ""

    def headers(self, target: str) -> dict[str, str]:
        if target == "jwt":
            return {"Authorization": f"Bearer {self.token}"}
        if target == "key":
            return {"X-API-Key": self.key}
        return {"X-Tenant-Id": str(self.id)}


@dataclass
class Slice:
    """One run of one variant: counts, wall time and a latency histogram (microseconds -> count)."""

    requests: int
    seconds: float
    bad: int  # non-2xx answers
    socket_errors: int
    histogram: Counter[int]
    first_error: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # "app", "pg", "client" -> CPU seconds

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Totals:
    slices: list[Slice] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.slices)

    @property
    def rate(self) -> float:
        seconds = sum(s.seconds for s in self.slices)
        return self.requests / seconds if seconds else 0.0

    @property
    def errors(self) -> int:
        return sum(s.bad + s.socket_errors for s in self.slices)

    def cpu_ms(self, who: str) -> float:
        """CPU milliseconds per request spent by `who` ("app", "pg", "client"); nan if unknown."""
        if not self.requests or any(who not in s.cpu for s in self.slices):
            return float("nan")
        return 1000 * sum(s.cpu[who] for s in self.slices) / self.requests

    def percentile_ms(self, q: float) -> float:
        merged: Counter[int] = Counter()
        for s in self.slices:
            merged.update(s.histogram)
        total = sum(merged.values())
        if not total:
            return float("nan")
        rank, seen = q * total, 0
        for value in sorted(merged):
            seen += merged[value]
            if seen >= rank:
                return value / 1000
        return max(merged) / 1000


def request_for(op: str, target: str, tenants: list[Tenant], i: int) -> tuple[str, str, dict[str, str], str | None]:
    """The i-th request of a variant: tenants round-robin; `get` walks each tenant's ids."""
    t = tenants[i % len(tenants)]
    headers = t.headers(target)
    if op == "list":
        return "GET", LIST_PATH, headers, None
    if op == "create":
        return "POST", "/api/v1/projects", {**headers, "Content-Type": "application/json"}, CREATE_BODY
    ident = t.project_ids[(i // len(tenants)) % len(t.project_ids)]
    return "GET", f"/api/v1/projects/{ident}", headers, None


# -- setup -----------------------------------------------------------------------------------------


async def create_tenants(admin: str, count: int, per_tenant: int) -> list[Tenant]:
    tag = uuid.uuid4().hex[:6]
    # The hash carries its own argon2 parameters: cheap ones make the N logins quick; verifying a
    # password is not what this benchmark measures.
    cheap = Settings(database_url=admin, argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1)
    pw_hash = await hash_password(cheap, PASSWORD)
    tenants: list[Tenant] = []
    async with operator_transaction(admin) as tx:
        for k in range(count):
            slug = f"bench-{k}-{tag}"
            created = await service.create_tenant(
                tx, TenantCreate(name=f"Bench tenant {k}", slug=slug, region="CH", plan="pro", status="active")
            )
            email = f"owner-{k}-{tag}@example.ch"
            row = await service.add_member(tx, slug, email, "owner", name=f"Owner {k}", password_hash=pw_hash)
            # The rate limiter still counts every request (its cost is part of the product's), but
            # with these limits it never refuses one: a 429 would be a cheap answer, not a result.
            await tx.fetchrow("SELECT * FROM platform.tenant_set_limits(%s, %s)", (created.id, Jsonb(NO_LIMITS)))
            tenants.append(Tenant(created.id, slug, email, row["user_id"]))
    async with await admin_connect(admin) as conn:
        await conn.execute(
            """INSERT INTO projects (tenant_id, name, description, status, settings, owner_id, created_at, updated_at)
               SELECT t.id, 'Project ' || g, 'Seeded by bench/api.py for tenant ' || t.k,
                      CASE WHEN g %% 10 = 0 THEN 'archived' ELSE 'active' END,
                      jsonb_build_object('seq', g, 'tags', jsonb_build_array('bench', 'seed')), t.owner,
                      now() - g * interval '1 minute', now() - g * interval '1 minute'
               FROM unnest(%s::uuid[], %s::int[]) WITH ORDINALITY AS t(id, owner, k), generate_series(1, %s) g""",
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


def start_server(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        # A session (process group) of its own: uvicorn's worker processes are stopped with it.
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_ready(
    client: httpx.AsyncClient, url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server {' '.join(proc.args)} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if (await client.get(url)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready after {timeout:.0f} s:\n{log_tail(log_path)}")
        await asyncio.sleep(0.2)


def expect(response: httpx.Response, status: int, what: str) -> httpx.Response:
    if response.status_code != status:
        raise SystemExit(f"{what}: expected {status}, got {response.status_code}: {response.text[:500]}")
    return response


async def create_login_users(admin: str, count: int) -> list[str]:
    """Users whose password hash has the service's argon2id parameters (the defaults)."""
    tag = uuid.uuid4().hex[:6]
    pw_hash = await hash_password(Settings(database_url=admin), PASSWORD)
    emails = []
    async with operator_transaction(admin) as tx:
        for k in range(count):
            email = f"login-{k}-{tag}@example.ch"
            await tx.fetchval("SELECT app.register_user(%s, %s, %s)", (email, f"Login {k}", pw_hash))
            emails.append(email)
    return emails


@dataclass
class AuthSlice:
    requests: int
    seconds: float
    bad: int
    first_error: str
    p50: float = 0.0  # ms
    p99: float = 0.0


async def auth_throughput(real: str, emails: list[str], seconds: float, concurrency: int) -> dict[str, AuthSlice]:
    """Sign-ins, then refreshes, each for `seconds` with `concurrency` loops in flight."""
    out: dict[str, AuthSlice] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=real, timeout=60, limits=limits) as client:

        async def run(name: str, step, loops: int) -> None:
            latencies: list[float] = []
            bad = 0
            first_error = ""
            stop_at = time.perf_counter() + seconds

            async def loop(i: int) -> None:
                nonlocal bad, first_error
                state: dict[str, str] = {}
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    r = await step(i, state)
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        bad += 1
                        first_error = first_error or f"{r.status_code} {r.text[:200]}"

            started = time.perf_counter()
            await asyncio.gather(*(loop(i) for i in range(loops)))
            elapsed = time.perf_counter() - started
            latencies.sort()
            sl = AuthSlice(requests=len(latencies), seconds=elapsed, bad=bad, first_error=first_error)
            sl.p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
            sl.p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else 0.0
            out[name] = sl

        async def login(i: int, state: dict[str, str]) -> httpx.Response:
            email = emails[i % len(emails)]
            return await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})

        chains: dict[int, str] = {}  # each loop's session: its current refresh token

        async def refresh(i: int, state: dict[str, str]) -> httpx.Response:
            r = await client.post("/api/v1/auth/refresh", json={"refresh_token": chains[i]})
            if r.status_code == 200:
                chains[i] = r.json()["refresh_token"]
            return r

        # Sign-ins: one in flight per core. More only queue in the hashing pool, which sheds the
        # excess with 503 (a bound by design, not a figure of merit).
        await run("login", login, max(1, min(concurrency, os.cpu_count() or 1)))
        for i in range(concurrency):  # one session per loop, signed in one after the other
            r = await login(i, {})
            if r.status_code != 200:
                raise SystemExit(f"sign-in before the refresh load: {r.status_code} {r.text[:200]}")
            chains[i] = r.json()["refresh_token"]
        await run("refresh", refresh, concurrency)
    return out


async def sign_in_and_check(real: str, bare: str, tenants: list[Tenant]) -> None:
    async with httpx.AsyncClient(base_url=real, timeout=30) as client:
        for t in tenants:
            body = expect(
                await client.post("/api/v1/auth/login", json={"email": t.email, "password": PASSWORD}), 200, "login"
            ).json()
            if body.get("tenant") is None:
                raise SystemExit(f"login of {t.email} selected no tenant: {body}")
            t.token = body["access_token"]
            created = expect(
                await client.post(
                    "/api/v1/api-keys", json={"name": "bench write key", "scope": "write"}, headers=t.headers("jwt")
                ),
                201,
                "create API key",
            ).json()
            t.key = created["key"]
        # The three variants answer the same thing for the same tenant...
        a = tenants[0]
        async with httpx.AsyncClient(base_url=bare, timeout=30) as bare_client:
            for path in (LIST_PATH, f"/api/v1/projects/{a.project_ids[0]}"):
                answers = [
                    expect(await client.get(path, headers=a.headers("jwt")), 200, f"GET {path} (JWT)").json(),
                    expect(await client.get(path, headers=a.headers("key")), 200, f"GET {path} (key)").json(),
                    expect(await bare_client.get(path, headers=a.headers("bare")), 200, f"GET {path} (bare)").json(),
                ]
                if not answers[0] == answers[1] == answers[2]:
                    raise SystemExit(f"GET {path}: the real and bare answers differ:\n{answers}")
            if len(answers[0]) == 0:
                raise SystemExit("empty answers")
        # ... and the real one does not leak across tenants.
        if len(tenants) > 1:
            b = tenants[1]
            expect(
                await client.get(f"/api/v1/projects/{a.project_ids[0]}", headers=b.headers("jwt")),
                404,
                "another tenant's project (JWT)",
            )
            expect(
                await client.get(f"/api/v1/projects/{a.project_ids[0]}", headers=b.headers("key")),
                404,
                "another tenant's project (API key)",
            )


# -- CPU accounting ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on (field 3 of proc(5))


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class CpuMeter:
    """CPU seconds, read from /proc, of: each server's process group; the PostgreSQL backends
    connected to the benchmark's database (when the server runs on this machine); and the load
    generator (this process and its finished children, i.e. wrk)."""

    def __init__(self, admin: str, groups: dict[str, int], shared: dict[str, int] | None = None) -> None:
        self.groups = groups
        self.shared = shared or {}  # process groups both servers use (PgBouncer), reported apart
        self.monitor = psycopg.connect(admin, autocommit=True)
        host = self.monitor.info.host
        own = self.monitor.info.backend_pid
        try:
            own_cmd = Path(f"/proc/{own}/cmdline").read_bytes()
        except OSError:
            own_cmd = b""
        # Only when the server runs here: a local address and our own backend visible in /proc.
        self.pg_visible = (host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")) and b"postgres" in own_cmd

    def close(self) -> None:
        self.monitor.close()

    def _backends(self) -> list[int]:
        rows = self.monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        return [r[0] for r in rows]

    def snapshot(self) -> dict[str, object]:
        groups: dict[str, float] = dict.fromkeys({**self.groups, **self.shared}, 0.0)
        wanted = {pgid: name for name, pgid in {**self.groups, **self.shared}.items()}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields is not None and int(fields[2]) in wanted:  # pgrp
                    groups[wanted[int(fields[2])]] += _cpu_seconds(fields)
        pg: dict[int, float] = {}
        if self.pg_visible:
            for pid in self._backends():
                fields = _stat(pid)
                if fields is not None:
                    pg[pid] = _cpu_seconds(fields)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        client = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return {"groups": groups, "pg": pg, "client": client}

    def delta(self, before: dict, group: str) -> dict[str, float]:
        after = self.snapshot()
        out = {"app": after["groups"][group] - before["groups"][group], "client": after["client"] - before["client"]}
        for name in self.shared:
            out[name] = after["groups"][name] - before["groups"][name]
        if self.pg_visible:
            out["pg"] = sum(cpu - before["pg"].get(pid, 0.0) for pid, cpu in after["pg"].items())
        return out


# -- load: wrk -------------------------------------------------------------------------------------


def lua_str(value: str) -> str:
    if not all(32 <= ord(ch) < 127 for ch in value):
        raise ValueError(f"not printable ASCII: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_script(op: str, target: str, tenants: list[Tenant], max_requests: int) -> str:
    """A wrk script issuing exactly the requests of `request_for`, counting non-2xx answers, and
    printing the summary and the full latency histogram in a form `run_wrk` parses."""
    rows = []
    for t in tenants:
        headers = ", ".join(f"[{lua_str(k)}] = {lua_str(v)}" for k, v in t.headers(target).items())
        if op == "create":
            headers += ', ["Content-Type"] = "application/json"'
        ids = ", ".join(map(str, t.project_ids)) if op == "get" else ""
        rows.append(f"  {{ headers = {{ {headers} }}, ids = {{ {ids} }} }},")
    method, body = ("POST", lua_str(CREATE_BODY)) if op == "create" else ("GET", "nil")
    return f"""-- Generated by bench/api.py: {op} against {LABELS[target]}.
local tenants = {{
{chr(10).join(rows)}
}}
local op = {lua_str(op)}
local method = {lua_str(method)}
local body = {body}
local max_requests = {int(max_requests)}
local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

-- globals, so that done() can read them from each thread
sent = 0
received = 0
bad = 0
first_bad = ""

function request()
  local n = #tenants
  local t = tenants[(sent % n) + 1]
  local path = {lua_str(LIST_PATH)}
  if op == "get" then
    path = "/api/v1/projects/" .. t.ids[(math.floor(sent / n) % #t.ids) + 1]
  elseif op == "create" then
    path = "/api/v1/projects"
  end
  sent = sent + 1
  return wrk.format(method, path, t.headers, body)
end

function response(status, headers, resp_body)
  received = received + 1
  if status < 200 or status > 299 then
    bad = bad + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.sub(resp_body or "", 1, 300)
    end
  end
  if received >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local b, first = 0, ""
  for _, thread in ipairs(threads) do
    b = b + thread:get("bad")
    local f = thread:get("first_bad")
    if first == "" and f ~= nil then first = f end
  end
  local e = summary.errors
  io.write(string.format("BENCH summary %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
                         e.connect, e.read, e.write, e.timeout, b))
  local parts = {{}}
  for i = 1, #latency do
    local v, c = latency(i)
    parts[#parts + 1] = string.format("%d:%d", v, c)
  end
  io.write("BENCH hist ", table.concat(parts, ","), "\\n")
  if first ~= "" then
    io.write("BENCH first ", (string.gsub(first, "[\\r\\n]", " ")), "\\n")
  end
end
"""


class WrkClient:
    def __init__(self, workdir: Path, concurrency: int, max_requests: int) -> None:
        self.workdir, self.concurrency, self.max_requests = workdir, concurrency, max_requests
        self.scripts: dict[tuple[str, str], Path] = {}

    def prepare(self, op: str, target: str, tenants: list[Tenant]) -> None:
        path = self.workdir / f"{op}-{target}.lua"
        path.write_text(lua_script(op, target, tenants, self.max_requests))
        self.scripts[(op, target)] = path

    def run(self, base: str, op: str, target: str, tenants: list[Tenant], seconds: int) -> Slice:
        cmd = [
            "wrk",
            "-t",
            "1",
            "-c",
            str(self.concurrency),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(self.scripts[(op, target)]),
            base,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
        summary = hist = None
        first = ""
        for line in out.stdout.splitlines():
            if line.startswith("BENCH summary "):
                summary = [int(x) for x in line.split()[2:]]
            elif line.startswith("BENCH hist"):
                hist = line.partition("BENCH hist")[2].strip()
            elif line.startswith("BENCH first "):
                first = line.removeprefix("BENCH first ")
        if out.returncode != 0 or summary is None or hist is None:
            raise SystemExit(f"wrk failed ({out.returncode}) for {op}/{target}:\n{out.stdout}\n{out.stderr}")
        requests, duration_us, connect, read, write, timeout, bad = summary
        histogram: Counter[int] = Counter()
        for pair in filter(None, hist.split(",")):
            value, _, count = pair.partition(":")
            histogram[int(value)] += int(count)
        return Slice(requests, duration_us / 1e6, bad, connect + read + write + timeout, histogram, first)


# -- load: httpx -----------------------------------------------------------------------------------


class HttpxClient:
    def __init__(self, concurrency: int, max_requests: int) -> None:
        self.concurrency, self.max_requests = concurrency, max_requests

    def prepare(self, op: str, target: str, tenants: list[Tenant]) -> None:
        pass

    def run(self, base: str, op: str, target: str, tenants: list[Tenant], seconds: int) -> Slice:
        return asyncio.run(self._run(base, op, target, tenants, seconds))

    async def _run(self, base: str, op: str, target: str, tenants: list[Tenant], seconds: int) -> Slice:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        histogram: Counter[int] = Counter()
        counts = {"done": 0, "bad": 0, "socket": 0}
        first: list[str] = []
        numbers = itertools.count()
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
            started = time.perf_counter()
            deadline = started + seconds

            async def worker() -> None:
                while True:
                    i = next(numbers)
                    if i >= self.max_requests or time.perf_counter() >= deadline:
                        return
                    method, path, headers, body = request_for(op, target, tenants, i)
                    t0 = time.perf_counter()
                    try:
                        r = await client.request(method, path, headers=headers, content=body)
                    except httpx.HTTPError as err:
                        counts["socket"] += 1
                        first.append(f"{type(err).__name__}: {err}")
                        continue
                    histogram[int((time.perf_counter() - t0) * 1e6)] += 1
                    counts["done"] += 1
                    if not 200 <= r.status_code < 300:
                        counts["bad"] += 1
                        first.append(f"{r.status_code} {r.text[:300]}")

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
            elapsed = time.perf_counter() - started
        return Slice(counts["done"], elapsed, counts["bad"], counts["socket"], histogram, first[0] if first else "")


# -- profiling -------------------------------------------------------------------------------------

OUR_CODE = (
    "iafactory/auth/",
    "iafactory/db/",
    "iafactory/resources/",
    "iafactory/http/",
    "iafactory/tenancy/",
    "iafactory/plans/",
)
PROFILE_RATE = 250  # samples per second
_LINE = re.compile(r" \((.*):\d+\)$")
_IDLE = re.compile(r"^(Condition\.wait|Event\.wait) \(threading\.py\)")


def summarize_profile(path: Path, requests: int, top: int = 12) -> str:
    """Inclusive time of our functions and self time of all functions, per request, from py-spy's
    collapsed stacks ("frame;frame;... count", frames "function (file:line)", aggregated here per
    function). py-spy counts a thread that waits for a CPU as busy: on a saturated machine, time
    spent preempted right after waking PostgreSQL shows up in psycopg's send functions."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    prefixes = (str(REPO / "src") + "/", sys.prefix + "/lib/", sys.base_prefix + "/lib/")
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            frame = _LINE.sub(r" (\1)", frame)
            for prefix in prefixes:
                frame = frame.replace(prefix, "")
            frames.append(frame)
        if _IDLE.match(frames[-1]):
            continue  # an idle worker thread (anyio's, from the sign-ins) that py-spy takes for busy
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return "    (no samples)"

    def ms(n: int) -> float:
        return 1000 * n / PROFILE_RATE / max(1, requests)

    lines = [
        f"    {total} busy samples at {PROFILE_RATE} Hz for {requests} requests: ~{ms(total):.3f} ms of busy "
        "Python thread per request",
        "    ms/request, inclusive, our code:",
    ]
    ours = [(f, n) for f, n in inclusive.items() if any(part in f for part in OUR_CODE)]
    for frame, n in sorted(ours, key=lambda x: -x[1])[:top]:
        lines.append(f"    {ms(n):7.3f}  {frame}")
    lines.append("    ms/request, self, anywhere:")
    for frame, n in own.most_common(top):
        lines.append(f"    {ms(n):7.3f}  {frame}")
    return "\n".join(lines)


def profile(
    client: WrkClient | HttpxClient,
    bases: dict[str, str],
    pids: dict[str, int],
    tenants: list[Tenant],
    seconds: int,
    outdir: Path,
) -> None:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"\nProfiles (py-spy record --subprocesses, {seconds} s per variant, under the same load):")
    for op in OPS:
        for target in TARGETS:
            out = outdir / f"{op}-{target}.txt"
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pids[target]),
                    "--subprocesses",
                    "--rate",
                    str(PROFILE_RATE),
                    "--duration",
                    str(seconds + 1),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            result = client.run(bases[target], op, target, tenants, seconds)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0 or not out.exists():
                raise SystemExit(f"py-spy failed ({spy.returncode}): {err}")
            print(f"\n  {op} / {LABELS[target]}: {result.rate:.0f} req/s while profiled -> {out}")
            print(summarize_profile(out, result.requests))


# -- main ------------------------------------------------------------------------------------------


def header(args: argparse.Namespace, admin: str, client_name: str, real: str, bare: str, per: int) -> None:
    settings = Settings()
    with psycopg.connect(admin) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    cores = os.cpu_count()
    warning = (
        ""
        if client_name.startswith("wrk")
        else (
            "\n               WARNING: httpx spends more CPU per request than the servers do: on a small machine the"
            "\n               client is the bottleneck and the ratios are pulled towards 1 (apt-get install wrk)"
        )
    )
    pooler = (
        f"both through PgBouncer (transaction mode, {args.pgbouncer_pool_size} server connections per database "
        "and user; no prepared statements on either side)"
        if args.pgbouncer
        else "direct (real: protocol-level prepared statements, IAFACTORY_DB_PREPARED_STATEMENTS=auto; "
        "bare: psycopg's automatic ones)"
    )
    limiter = (
        "Redis (IAFACTORY_REDIS_URL)"
        if getattr(settings, "redis_url", None)
        else "PostgreSQL (app.rate_hit in each request's first message)"
    )
    print(f"""
HTTP API vs bare baseline
  machine      {cores} cores ({platform.machine()}), Python {platform.python_version()}, PostgreSQL {pg}, load average {os.getloadavg()[0]:.2f} at start
               NOTE: the load generator, the server under test and PostgreSQL all share these {cores} cores;
               the figures compare the two apps on equal terms, they are not capacity.
  real         {real}  iafactory serve --workers {args.workers} (pool {settings.pool_min_size}-{settings.pool_max_size} connections, app role, RLS)
               rate limiter: {limiter}
  bare         {bare}  bench/api_bare.py --workers {args.workers} (same pool size, admin role, no auth / RLS / scope)
  load         {client_name}, {args.concurrency} requests in flight, {args.tenants} tenants round-robin, {per} seeded projects each
               (rate limits overridden per tenant so that the counter runs on every request but never refuses){warning}
  timing       warm-up {args.warmup} s per variant, then {args.rounds} rounds x {args.seconds // args.rounds} s per variant, interleaved
  database     {pooler}
""")


def report(results: dict[tuple[str, str], Totals], args: argparse.Namespace) -> None:
    print(
        f"\nResults ({args.rounds} rounds x {args.seconds // args.rounds} s per variant, "
        f"{args.concurrency} in flight, {args.tenants} tenants):"
    )
    print(f"  {'':<26}{'':>10}{'':>10}{'':>9}{'':>9}{'':>9}{'':>23}{'':>8}   CPU ms per request")
    print(
        f"  {'operation':<10}{'endpoint':<16}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'vs bare':>9}{'rounds req/s min-max':>23}{'errors':>8}{'app':>8}{'PG':>7}{'load':>7}"
        + (f"{'pooler':>8}" if args.pgbouncer else "")
    )
    below = []
    for op in OPS:
        base = results[(op, "bare")].rate
        for target in TARGETS:
            r = results[(op, target)]
            rates = [s.rate for s in r.slices]
            ratio = r.rate / base if base else float("nan")
            print(
                f"  {op:<10}{LABELS[target]:<16}{r.requests:>10}{r.rate:>10.0f}{r.percentile_ms(0.5):>9.2f}"
                f"{r.percentile_ms(0.99):>9.2f}{ratio:>8.2f}x{min(rates):>11.0f} - {max(rates):<9.0f}{r.errors:>8}"
                f"{r.cpu_ms('app'):>8.2f}{r.cpu_ms('pg'):>7.2f}{r.cpu_ms('client'):>7.2f}"
                + (f"{r.cpu_ms('pooler'):>8.2f}" if args.pgbouncer else "")
            )
            if target != "bare" and ratio < TARGET_RATIO:
                below.append(f"{op} / {LABELS[target]} {ratio:.2f}x")
    print(f"  (load average at the end: {os.getloadavg()[0]:.2f})")
    print(
        "  (CPU: app = the server's processes, PG = the backends of the benchmark database, load = the load "
        "generator;\n   from /proc, per completed request; nan where PostgreSQL is not on this machine)"
    )
    print(
        f"\nTarget: real >= {TARGET_RATIO:.1f}x bare for the same operation: "
        + ("met by every variant" if not below else "NOT met by " + ", ".join(below))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per variant, over all rounds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes, for both servers")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--port", type=int, default=None, help="real server's port (bare: port + 1)")
    parser.add_argument("--projects", type=int, default=300, help="seeded projects per tenant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="seconds per variant before measuring")
    parser.add_argument("--max-requests", type=int, default=500_000, help="cap on requests per slice")
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy both servers into this folder")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--auth-seconds", type=float, default=5.0, help="sign-in and refresh load, each (0: skip)")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="both servers through PgBouncer in transaction mode (scripts/pgbouncer.py)",
    )
    parser.add_argument(
        "--pgbouncer-pool-size",
        type=int,
        default=5,
        help="PgBouncer's server connections per database and user (apps' pools: 10)",
    )
    args = parser.parse_args()
    if args.tenants < 1 or args.projects < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--tenants, --projects, --concurrency and --rounds must be >= 1")
    args.rounds = min(args.rounds, max(1, args.seconds))  # whole seconds per slice (wrk's unit)
    slice_seconds = max(1, args.seconds // args.rounds)
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), or use --client httpx")

    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_api")
    workdir = Path(tempfile.mkdtemp(prefix="iaf-bench-api-"))
    procs: list[subprocess.Popen] = []
    closers: list = []
    errors = 0
    try:
        print(f"Database {name}: migrating, {args.tenants} tenants x {args.projects} projects ...", flush=True)
        asyncio.run(bootstrap.migrate_and_prepare(admin, bench_settings(admin)))
        tenants = asyncio.run(create_tenants(admin, args.tenants, args.projects))

        real_port = args.port or free_port()
        bare_port = args.port + 1 if args.port else free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("IAFACTORY_DATABASE_URL", "IAFACTORY_APP_DATABASE_URL", "BENCH_BARE_DATABASE_URL")
        }
        env.update(BENCH_SECRET_ENV, DATABASE_URL=admin, IAFACTORY_LOG_LEVEL="WARNING", BENCH_BARE_DATABASE_URL=admin)
        shared: dict[str, int] = {}
        if args.pgbouncer:
            sys.path.insert(0, str(REPO / "scripts"))
            import pgbouncer

            settings = bench_settings(admin)
            bouncer = pgbouncer.start(
                url,
                users=[conninfo_to_dict(admin).get("user") or "postgres", settings.app_db_user],
                pool_size=args.pgbouncer_pool_size,
            )
            closers.append(bouncer.stop)
            shared["pooler"] = bouncer.process.pid
            env.update(
                IAFACTORY_APP_DATABASE_URL=bouncer.url(server.app_direct_conninfo(settings, admin)),
                BENCH_BARE_DATABASE_URL=bouncer.url(admin),
                BENCH_BARE_PREPARE="0",
            )
        iafactory = str(Path(sys.executable).with_name("iafactory"))
        real_log, bare_log = workdir / "real.log", workdir / "bare.log"
        real_proc = start_server(
            [
                iafactory,
                "serve",
                "--no-migrate",
                "--host",
                HOST,
                "--port",
                str(real_port),
                "--workers",
                str(args.workers),
            ],
            env,
            real_log,
        )
        procs.append(real_proc)
        bare_proc = start_server(
            [
                sys.executable,
                str(BENCH_DIR / "api_bare.py"),
                "--host",
                HOST,
                "--port",
                str(bare_port),
                "--workers",
                str(args.workers),
            ],
            env,
            bare_log,
        )
        procs.append(bare_proc)
        real, bare = f"http://{HOST}:{real_port}", f"http://{HOST}:{bare_port}"

        async def ready() -> None:
            async with httpx.AsyncClient(timeout=5) as c:
                await wait_ready(c, real + "/readyz", real_proc, real_log)
                await wait_ready(c, bare + "/healthz", bare_proc, bare_log)
            await sign_in_and_check(real, bare, tenants)

        asyncio.run(ready())
        client: WrkClient | HttpxClient = (
            WrkClient(workdir, args.concurrency, args.max_requests)
            if use_wrk
            else HttpxClient(args.concurrency, args.max_requests)
        )
        client_name = "wrk -t1 (C, Lua scripts generated per variant)" if use_wrk else "httpx.AsyncClient (Python)"
        meter = CpuMeter(admin, {"real": real_proc.pid, "bare": bare_proc.pid}, shared)
        closers.append(meter.close)
        header(args, admin, client_name, real, bare, args.projects)
        bases = {"jwt": real, "key": real, "bare": bare}
        for op in OPS:
            for target in TARGETS:
                client.prepare(op, target, tenants)

        def check(s: Slice, what: str) -> None:
            nonlocal errors
            if s.bad or s.socket_errors:
                errors += s.bad + s.socket_errors
                print(
                    f"  !! {what}: {s.bad} non-2xx, {s.socket_errors} socket errors; first: {s.first_error}", flush=True
                )
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(
                        f"server {' '.join(proc.args)} died ({proc.returncode}):\n"
                        f"{log_tail(real_log if proc is real_proc else bare_log)}"
                    )

        if args.warmup > 0:
            print("Warm-up:")
            for op in OPS:
                for target in TARGETS:
                    s = client.run(bases[target], op, target, tenants, args.warmup)
                    print(f"  {op:<8}{LABELS[target]:<16}{s.rate:10.0f} req/s", flush=True)
                    check(s, f"warm-up {op} / {LABELS[target]}")
        results = {(op, target): Totals() for op in OPS for target in TARGETS}
        print("Measured rounds:")
        for rnd in range(args.rounds):
            order = TARGETS[rnd % 3 :] + TARGETS[: rnd % 3]
            line = []
            for op in OPS:
                for target in order:
                    before = meter.snapshot()
                    s = client.run(bases[target], op, target, tenants, slice_seconds)
                    s.cpu = meter.delta(before, "bare" if target == "bare" else "real")
                    results[(op, target)].slices.append(s)
                    check(s, f"round {rnd + 1} {op} / {LABELS[target]}")
                    line.append(f"{op}/{target} {s.rate:.0f}")
            print(f"  round {rnd + 1}/{args.rounds}: " + ", ".join(line), flush=True)
        report(results, args)
        if args.auth_seconds > 0:
            emails = asyncio.run(create_login_users(admin, max(1, min(args.concurrency, 16))))
            auth = asyncio.run(auth_throughput(real, emails, args.auth_seconds, args.concurrency))
            print("Sessions (httpx client, argon2id at the service's defaults: t=3, 64 MiB, p=4):")
            for name, sl in auth.items():
                print(
                    f"  {name:<8}{sl.requests / sl.seconds:10.1f} req/s   p50 {sl.p50:8.1f} ms   p99 {sl.p99:8.1f} ms"
                    f"   ({sl.requests} in {sl.seconds:.1f} s)",
                    flush=True,
                )
                if sl.bad:
                    errors += sl.bad
                    print(f"  !! {name}: {sl.bad} non-200; first: {sl.first_error}", flush=True)
            if auth["login"].requests and auth["refresh"].requests:
                ratio = (auth["refresh"].requests / auth["refresh"].seconds) / (
                    auth["login"].requests / auth["login"].seconds
                )
                print(f"  a refresh costs 1/{ratio:.0f} of a sign-in (throughput ratio)", flush=True)
        if args.profile is not None:
            profile(
                client,
                bases,
                {"jwt": real_proc.pid, "key": real_proc.pid, "bare": bare_proc.pid},
                tenants,
                max(slice_seconds, 5),
                args.profile,
            )
    finally:
        for close in closers:
            close()
        for proc in procs:
            stop_server(proc)
        if not args.keep:
            drop_database(url, name)
        else:
            print(f"kept database {name}: {admin}")
        shutil.rmtree(workdir, ignore_errors=True)
    if errors:
        raise SystemExit(f"FAILED: {errors} failed requests (non-2xx or socket errors), see the lines marked !!")


if __name__ == "__main__":
    main()
