"""What does Row-Level Security cost? And what does setting the tenant cost per request?

    python bench/rls_overhead.py [--rows 1000000] [--tenants 1000] [--clients 4] [--seconds 5]
                                 [--rounds 3] [--database-url URL] [--keep] [--pgbouncer] [--client-only]

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
2. Client side, through iafactory.db.scope: a request-shaped read (tenant set + one query), a
   single-statement write shape, and what an HTTP request really sends (rate counter, gate, query),
   against the same query sent bare on an admin connection, interleaved in one process.
   With --pgbouncer, the scope's pool and the bare one both go through PgBouncer in transaction
   mode (scripts/pgbouncer.py): no prepared statements on either side.
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
import psycopg.conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).parent))
from _common import BackendCpu, bench_settings, create_database, drop_database, median, pgbench, server_url
from iafactory.config import Settings
from iafactory.db import bootstrap, server
from iafactory.plans import ratelimit
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


async def client_side(
    admin: str,
    settings: Settings,
    per: int,
    n: int = 2000,
    rounds: int = 10,
    pooler: str | None = None,
    pooler_pid: int | None = None,
) -> None:
    """`pooler`: a URL whose host and port replace the server's (PgBouncer), for both sides.

    Reports wall time (one client, so latency) and CPU per request: this process's plus the
    database backends' (plus the pooler's), which a busy machine disturbs far less."""
    tenants = [tenant_uuid(k) for k in range(50)]
    with psycopg.connect(admin, autocommit=True) as conn:
        # A member of each tenant, for the gate; limits that the counter never reaches.
        user = conn.execute(
            "INSERT INTO users (email, name) VALUES ('bench-rls@example.ch', 'Bench') "
            "ON CONFLICT DO NOTHING RETURNING id"
        ).fetchone()
        user_id = (
            user[0] if user else conn.execute("SELECT id FROM users WHERE email = 'bench-rls@example.ch'").fetchone()[0]
        )
        conn.execute(
            "INSERT INTO tenant_users (tenant_id, user_id, role) SELECT t, %s, 'owner' FROM unnest(%s::uuid[]) t "
            "ON CONFLICT DO NOTHING",
            (user_id, tenants),
        )
        conn.execute(
            """SELECT platform.tenant_set_limits(t, '{"requests_per_minute": 1000000000}')
                        FROM unnest(%s::uuid[]) t""",
            (tenants,),
        )

    def through(url: str) -> str:
        if pooler is None:
            return url
        params = psycopg.conninfo.conninfo_to_dict(url)
        params.update({k: v for k, v in psycopg.conninfo.conninfo_to_dict(pooler).items() if k in ("host", "port")})
        return psycopg.conninfo.make_conninfo(**params)

    if pooler is not None:
        settings = settings.model_copy(
            update={"app_database_url": through(server.app_direct_conninfo(settings, admin))}
        )
    # One connection on each side, as one client needs.
    db = bootstrap.database(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}), admin)
    # Same row factory as the scope, so only the tenant handling differs; psycopg's own automatic
    # prepared statements, except behind the pooler.
    bare = AsyncConnectionPool(
        through(admin),
        min_size=1,
        max_size=1,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row, **({"prepare_threshold": None} if pooler else {})},
    )
    query = "SELECT id, title, created_at FROM knowledge_base WHERE tenant_id = %s ORDER BY created_at DESC LIMIT 20"
    gate = ("SELECT app.authorize(%s, %s)", ("viewer", False))
    labels = {
        "bare": "bare query (admin, autocommit)",
        "read": "tenant scope, read-only (one round trip)",
        "last": "tenant scope, read-write, last=True (one trip)",
        "write": "tenant scope, read-write (+ COMMIT trip)",
        "request": "HTTP request's: counter + gate + read (one trip)",
    }
    timings: dict[str, list[float]] = {key: [] for key in labels}
    cpu: dict[str, list[float]] = {key: [] for key in labels}
    meter = BackendCpu(admin, (pooler_pid,) if pooler_pid else ())
    await db.open()
    await bare.open()
    try:
        keys = list(labels)
        for rnd in range(rounds):
            for key in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:  # rotate: no shape always first
                started, own, server_before = time.perf_counter(), time.process_time(), meter.snapshot()
                for i in range(n):
                    t = tenants[i % 50]
                    if key == "bare":
                        async with bare.connection() as conn:
                            await (await conn.execute(query, (t,))).fetchall()
                    elif key == "request":
                        async with db.tenant(
                            TenantContext(tenant_id=t, user_id=user_id),
                            read_only=True,
                            gate=gate,
                            before=ratelimit.postgres_counter(t, None),
                        ) as tx:
                            await tx.fetch(query, (t,))
                    else:
                        async with db.tenant(TenantContext(tenant_id=t), read_only=key == "read") as tx:
                            await tx.fetch(query, (t,), last=key == "last")
                timings[key].append(time.perf_counter() - started)
                cpu[key].append(time.process_time() - own + meter.since(server_before))
    finally:
        await db.close()
        await bare.close()
        meter.close()
    base = median(timings["bare"])
    where = (
        "through PgBouncer, no prepared statements"
        if pooler
        else f"direct, prepared statements {'on' if db.prepared_statements else 'off'}"
    )
    print(f"\nClient side (iafactory.db.scope, one client, {n} requests x {rounds} rounds, interleaved; {where}):")
    cpu_base = median(cpu["bare"])
    print(f"  {'shape':<52}{'req/s':>8}{'time vs bare':>14}{'rounds min-max':>17}{'CPU us/req':>12}{'CPU vs bare':>13}")
    for key, label in labels.items():
        m = median(timings[key])
        per_round = [t / b for t, b in zip(timings[key], timings["bare"], strict=True)]
        c = median(cpu[key])
        print(
            f"  {label:<52}{n / m:8.0f}{m / base:13.2f}x{min(per_round):>9.2f} - {max(per_round):<5.2f}"
            f"{1e6 * c / n:>12.0f}{c / cpu_base:>12.2f}x"
        )
    print("  (CPU: this process + the database's backends" + (" + PgBouncer" if pooler else "") + ", per request)")


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
    parser.add_argument("--pgbouncer", action="store_true", help="also the client side through PgBouncer")
    parser.add_argument("--client-only", action="store_true", help="skip the server side (pgbench) and the plans")
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
        if not args.client_only:
            server_side(admin, settings.app_db_user, args, per)
            show_plans(admin, settings.app_db_user, per)
        asyncio.run(client_side(admin, settings, per))
        if args.pgbouncer:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
            import pgbouncer

            admin_user = psycopg.conninfo.conninfo_to_dict(admin).get("user") or "postgres"
            with pgbouncer.start(url, users=[admin_user, settings.app_db_user], pool_size=2) as bouncer:
                asyncio.run(
                    client_side(admin, settings, per, pooler=bouncer.url(admin), pooler_pid=bouncer.process.pid)
                )
    finally:
        if not args.keep:
            drop_database(url, name)


if __name__ == "__main__":
    main()
