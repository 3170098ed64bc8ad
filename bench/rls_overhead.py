"""What does Row-Level Security cost? And what does setting the tenant cost per request?

    python bench/rls_overhead.py [--rows 1000000] [--tenants 1000] [--clients 4] [--seconds 5]
                                 [--rounds 3] [--database-url URL] [--keep]

1. Server side, with pgbench (C client, so the server is what is measured): a tenant's "latest 20"
   knowledge-base page and a point lookup of a project by id, each in three variants with the
   same transaction shape on the same connections (BEGIN READ ONLY; SET LOCAL ROLE ...;
   SET LOCAL app.tenant_id = ...; query; COMMIT):
     rls            the application role; the policy is the only tenant filter
     rls+filter     the application role; the query also says WHERE tenant_id = ... (what our
                    repositories send)
     no-rls         the admin role (RLS bypassed); the query says WHERE tenant_id = ... (baseline)
   Variants run interleaved, round after round; medians and ratios against no-rls are printed,
   and the plans under RLS are shown.
2. Client side, through iafactory.db.scope: a request-shaped read (tenant set + one query) against
   the same query sent bare on an admin connection, interleaved in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_settings, create_database, drop_database, median, pgbench, server_url
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.tenancy.context import TenantContext

TENANT_BASE = 100000  # tenant k has id 00000000-0000-4000-8000-000000{TENANT_BASE + k}

# The tenant as the repositories send it: a bound value, here substituted by pgbench.
TENANT_LITERAL = "'00000000-0000-4000-8000-000000:t'::uuid"
LATEST = "SELECT id, title, created_at FROM knowledge_base{where} ORDER BY created_at DESC LIMIT 20"
POINT = "SELECT id, name, status, updated_at FROM projects WHERE {where}id = :id"


def tenant_uuid(k: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-4000-8000-000000{TENANT_BASE + k}")


def script(role: str, query: str, protocol: str) -> str:
    # The application sends SET LOCAL app.tenant_id and runs prepared statements. pgbench cannot
    # bind a parameter into SET, so in prepared mode the setting is made with set_config(..., true)
    # -- transaction-local all the same, and identical in every variant.
    if protocol == "prepared":
        setting = "SELECT set_config('app.tenant_id', '00000000-0000-4000-8000-000000' || :t, true);"
        query = query.replace(TENANT_LITERAL, "('00000000-0000-4000-8000-000000' || :t)::uuid")
    else:
        setting = f"SET LOCAL app.tenant_id = {TENANT_LITERAL.removesuffix('::uuid')};"
    return "\n".join(
        [
            f"\\set t random({TENANT_BASE}, {TENANT_BASE} + :ntenants - 1)",
            "\\set id (:t - " + str(TENANT_BASE) + ") * :per + random(1, :per)",
            "BEGIN READ ONLY;",
            f"SET LOCAL ROLE {role};",
            setting,
            query + ";",
            "COMMIT;",
            "",
        ]
    )


def fill(admin: str, tenants: int, per: int) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute(
            """INSERT INTO tenants (id, name, slug, region, plan, status)
               SELECT ('00000000-0000-4000-8000-000000' || (%s + k))::uuid, 'Bench ' || k, 'bench-' || k,
                      (ARRAY['DZ','CH','FR','BE','CA'])[1 + k %% 5], 'pro', 'active'
               FROM generate_series(0, %s - 1) k""",
            (TENANT_BASE, tenants),
        )
        step = max(1, 200_000 // per)
        for table, sql_text in (
            (
                "projects",
                """INSERT INTO projects (id, tenant_id, name, description, created_at)
                SELECT k * %(per)s::int + r, ('00000000-0000-4000-8000-000000' || (%(base)s::int + k))::uuid,
                       'Project ' || r, 'Bench project', now() - r * interval '1 minute'
                FROM generate_series(%(lo)s::int, %(hi)s::int) k, generate_series(1, %(per)s::int) r""",
            ),
            (
                "knowledge_base",
                """INSERT INTO knowledge_base (id, tenant_id, title, content, language, created_at)
                SELECT k * %(per)s::int + r, ('00000000-0000-4000-8000-000000' || (%(base)s::int + k))::uuid,
                       'Document ' || r, repeat('Contenu du document de référence. ', 6), 'fr',
                       now() - r * interval '1 minute'
                FROM generate_series(%(lo)s::int, %(hi)s::int) k, generate_series(1, %(per)s::int) r""",
            ),
        ):
            started = time.perf_counter()
            for lo in range(0, tenants, step):
                hi = min(tenants, lo + step) - 1
                conn.execute(sql_text, {"per": per, "base": TENANT_BASE, "lo": lo, "hi": hi})
                done = (hi + 1) * per
                print(f"\r  {table}: {done:,} / {tenants * per:,} rows", end="", flush=True)
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {tenants * per + 1})")
            print(f"  ({time.perf_counter() - started:.1f} s)")
        conn.execute("VACUUM ANALYZE projects")
        conn.execute("VACUUM ANALYZE knowledge_base")


def run_pgbench(url: str, path: Path, clients: int, seconds: int, tenants: int, per: int, protocol: str) -> float:
    out = subprocess.run(
        [
            pgbench(),
            "-n",
            "-M",
            protocol,
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(seconds),
            "-D",
            f"ntenants={tenants}",
            "-D",
            f"per={per}",
            "-f",
            str(path),
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or not match or "failed transactions: 0 " not in out.stdout:
        raise SystemExit(f"pgbench failed for {path.name}:\n{out.stdout}\n{out.stderr}")
    return float(match.group(1))


def server_side(admin: str, app_user: str, args: argparse.Namespace, per: int) -> None:
    variants = {
        "latest20 rls": script(app_user, LATEST.format(where=""), args.protocol),
        "latest20 rls+filter": script(
            app_user, LATEST.format(where=f" WHERE tenant_id = {TENANT_LITERAL}"), args.protocol
        ),
        "latest20 no-rls": script("NONE", LATEST.format(where=f" WHERE tenant_id = {TENANT_LITERAL}"), args.protocol),
        "point rls": script(app_user, POINT.format(where=""), args.protocol),
        "point rls+filter": script(app_user, POINT.format(where=f"tenant_id = {TENANT_LITERAL} AND "), args.protocol),
        "point no-rls": script("NONE", POINT.format(where=f"tenant_id = {TENANT_LITERAL} AND "), args.protocol),
    }
    tmp = Path(tempfile.mkdtemp(prefix="iaf-bench-"))
    paths = {}
    for name, text in variants.items():
        paths[name] = tmp / (name.replace(" ", "_").replace("+", "_") + ".sql")
        paths[name].write_text(text)
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate: no variant always first
        for name in order:
            tps = run_pgbench(admin, paths[name], args.clients, args.seconds, args.tenants, per, args.protocol)
            results[name].append(tps)
            print(f"  round {rnd + 1}/{args.rounds}  {name:<22} {tps:10.0f} tps", flush=True)
    print(
        f"\nServer side (pgbench -M {args.protocol}, {args.clients} clients, {args.seconds} s x {args.rounds} rounds, "
        "interleaved):"
    )
    print(f"  {'variant':<22}{'median tps':>12}{'vs no-rls':>12}")
    for query in ("latest20", "point"):
        base = median(results[f"{query} no-rls"])
        for variant in ("rls", "rls+filter", "no-rls"):
            m = median(results[f"{query} {variant}"])
            print(f"  {query + ' ' + variant:<22}{m:12.0f}{m / base:12.3f}")


def show_plans(admin: str, app_user: str, per: int) -> None:
    tid = tenant_uuid(7)
    with psycopg.connect(admin) as conn:
        conn.execute(f"SET ROLE {app_user}")
        conn.execute(f"SET app.tenant_id = '{tid}'")  # a throw-away session of this script, not the app
        for title, query in (
            ("latest 20 under RLS", LATEST.format(where="")),
            ("point lookup under RLS", POINT.format(where="").replace(":id", str(7 * per + 3))),
        ):
            plan = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query).fetchall()
            print(f"\nPlan, {title}:")
            for (line,) in plan:
                print("  " + line)


async def client_side(admin: str, settings: Settings, per: int, n: int = 3000, rounds: int = 5) -> None:
    db = bootstrap.database(settings, admin)
    # Same row factory as the scope, so only the tenant handling differs.
    bare = AsyncConnectionPool(
        admin, min_size=1, max_size=1, open=False, kwargs={"autocommit": True, "row_factory": dict_row}
    )
    query = "SELECT id, title, created_at FROM knowledge_base WHERE tenant_id = %s ORDER BY created_at DESC LIMIT 20"
    tenants = [tenant_uuid(k) for k in range(50)]
    await db.open()
    await bare.open()
    timings: dict[str, list[float]] = {"bare": [], "tenant read": [], "tenant read-write": []}
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(n):
                async with bare.connection() as conn:
                    await (await conn.execute(query, (tenants[i % 50],))).fetchall()
            timings["bare"].append(time.perf_counter() - started)
            for label, read_only in (("tenant read", True), ("tenant read-write", False)):
                started = time.perf_counter()
                for i in range(n):
                    t = tenants[i % 50]
                    async with db.tenant(TenantContext(tenant_id=t), read_only=read_only) as tx:
                        await tx.fetch(query, (t,))
                timings[label].append(time.perf_counter() - started)
    finally:
        await db.close()
        await bare.close()
    base = median(timings["bare"])
    print(f"\nClient side (iafactory.db.scope, one client, {n} requests x {rounds} rounds, interleaved):")
    print(f"  {'shape':<44}{'req/s':>10}{'time vs bare':>14}")
    labels = {
        "bare": "bare query (admin, autocommit)",
        "tenant read": "tenant scope, read-only (one round trip)",
        "tenant read-write": "tenant scope, read-write (+ COMMIT trip)",
    }
    for key, label in labels.items():
        m = median(timings[key])
        print(f"  {label:<44}{n / m:10.0f}{m / base:14.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in EACH of projects and knowledge_base")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--protocol",
        choices=("prepared", "simple"),
        default="prepared",
        help="pgbench query mode (the application uses prepared statements)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    if args.tenants > 900000 or args.rows < args.tenants:
        parser.error("need tenants <= 900000 and rows >= tenants")
    per = args.rows // args.tenants
    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_rls")
    settings = bench_settings(admin)
    print(f"Database {name}: {args.tenants} tenants x {per} rows in projects and in knowledge_base")
    try:
        asyncio.run(bootstrap.migrate_and_prepare(admin, settings))
        fill(admin, args.tenants, per)
        server_side(admin, settings.app_db_user, args, per)
        show_plans(admin, settings.app_db_user, per)
        asyncio.run(client_side(admin, settings, per))
    finally:
        if not args.keep:
            drop_database(url, name)


if __name__ == "__main__":
    main()
