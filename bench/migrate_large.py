"""How much does the tenancy upgrade (006 + 007) disturb a live single-tenant application?

    python bench/migrate_large.py [--rows N] [--database-url URL] [--baseline-seconds S] [--timeout S]

Creates a fresh database on the server (--database-url, else DATABASE_URL, else the embedded
PostgreSQL), applies 001-005, fills knowledge_base with N realistic rows, then runs 006 and 007
with the real runner while another connection keeps inserting single rows into knowledge_base in
autocommit, as the old single-tenant application does (its INSERT names no tenant_id). Prints the
migration times and the inserter's latencies during the migration, against a baseline measured
the same way for a few seconds just before. Then checks that every row, old or inserted during
the migration, has a tenant_id, and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import threading
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import create_database, drop_database, percentile
from iafactory.config import Settings
from iafactory.db import migrate, server

DEFAULT_TENANT = "00000000-0000-0000-0000-000000000000"
MIGRATE_APP_NAME = "iaf-bench-migrate"
INSERTER_APP_NAME = "iaf-bench-inserter"
FILL_CHUNK = 100_000

FILL_SQL = """
INSERT INTO knowledge_base (title, content, source, language, metadata, created_at, updated_at)
SELECT 'Document ' || i || ' - ' || (ARRAY['Contrat de bail', 'Procès-verbal', 'Fiche patient',
                                          'Bilan annuel', 'Cours de mathématiques'])[1 + mod(i, 5)],
       repeat('Paragraphe ' || i || ' du corpus RAG, texte représentatif d''un document client. ', 4),
       'https://docs.example.ch/kb/' || (i / 100) || '/' || i || '.pdf',
       (ARRAY['fr', 'de', 'it', 'en', 'ar'])[1 + mod(i, 5)],
       jsonb_build_object('chunk', mod(i, 40), 'pages', 1 + mod(i, 30), 'tags', jsonb_build_array('rag', 'import')),
       ts, ts
FROM generate_series(%s::bigint, %s::bigint) AS i,
     LATERAL (SELECT now() - (mod(i, 730)) * interval '1 day' - (mod(i, 86400)) * interval '1 second' AS ts) AS t
"""

# What the old application sends: no tenant_id.
APP_INSERT = """INSERT INTO knowledge_base (title, content, source, language, metadata)
                VALUES (%s, %s, %s, %s, %s::jsonb)"""


def log(message: str) -> None:
    print(message, flush=True)


def _insert_loop(url: str, ready, stop, count, out) -> None:  # runs in the inserter's own process
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    with psycopg.connect(url, autocommit=True, application_name=INSERTER_APP_NAME) as conn:
        ready.set()
        n = 0
        while not stop.is_set():
            n += 1
            params = (
                f"Note live {n}",
                f"Saisie pendant la migration, numéro {n}.",
                f"https://app.example.ch/notes/{n}",
                "fr",
                '{"live": true}',
            )
            started = time.perf_counter()
            try:
                conn.execute(APP_INSERT, params)
            except psycopg.Error as err:  # the point of the benchmark is that this never happens
                errors.append(f"{type(err).__name__}: {err}".splitlines()[0])
                continue
            samples.append((started, time.perf_counter() - started))
            count.value += 1
    out.send((samples, errors))
    out.close()


class Inserter:
    """The old application: single-row INSERTs in autocommit, one after another, in a process of
    its own (so that the runner's Python work does not show up as insert latency). Records
    (start, latency) of each insert; perf_counter is CLOCK_MONOTONIC, shared by both processes."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.count = ctx.Value("q", 0, lock=False)
        self._results, sender = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_insert_loop, args=(url, self.ready, self.stop, self.count, sender), name="inserter", daemon=True
        )
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []

    def start(self) -> None:
        self.process.start()
        if not self.ready.wait(60):
            raise RuntimeError("the inserter could not connect within 60 s")

    def finish(self) -> None:
        self.stop.set()
        self.samples, self.errors = self._results.recv()
        self.process.join()

    def between(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.samples if start <= t < end]


def stats_ms(values: list[float]) -> str:
    if not values:
        return "no inserts"
    return (
        f"p50 {percentile(values, 0.50) * 1000:7.3f} ms   p99 {percentile(values, 0.99) * 1000:8.3f} ms   "
        f"max {max(values) * 1000:9.3f} ms"
    )


def fill(url: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        started = time.perf_counter()
        for first in range(1, rows + 1, FILL_CHUNK):
            last = min(rows, first + FILL_CHUNK - 1)
            conn.execute(FILL_SQL, (first, last))
            elapsed = time.perf_counter() - started
            log(f"  knowledge_base: {last:>10,} / {rows:,} rows  ({elapsed:5.1f} s, {last / elapsed:,.0f} rows/s)")
        # A few rows in the other old tables, so that 007 has references to scope.
        conn.execute(
            "INSERT INTO users (email, name) SELECT 'user' || i || '@example.ch', 'User ' || i "
            "FROM generate_series(1, 50) i"
        )
        conn.execute(
            "INSERT INTO projects (name, owner_id) SELECT 'Projet ' || i, 1 + i % 50 FROM generate_series(1, 200) i"
        )
        conn.execute(
            "INSERT INTO bolt_workflows (project_id, name, status) SELECT 1 + i % 200, 'Bolt ' || i, "
            "'completed' FROM generate_series(1, 2000) i"
        )
        conn.execute(
            "INSERT INTO bmad_workflows (project_id, name) SELECT 1 + i % 200, 'BMAD ' || i "
            "FROM generate_series(1, 1000) i"
        )
        conn.execute(
            "INSERT INTO orchestrator_state (session_key, agent) SELECT 's' || i, 'rag' FROM generate_series(1, 2000) i"
        )
        log("  VACUUM ANALYZE (as autovacuum would have done on a table of that age), CHECKPOINT ...")
        conn.execute("VACUUM ANALYZE")
        # Flush the fill now, so that its checkpoint does not land in the baseline (or the migration).
        conn.execute("CHECKPOINT")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('knowledge_base'))").fetchone()[0]
        log(f"  knowledge_base is {size}, filled in {time.perf_counter() - started:.1f} s")


class Monitor:
    """Samples pg_stat_activity every few milliseconds while the migration runs: which statement the
    runner is on, and whether the inserter is waiting for a lock (and on whom). Prints progress."""

    SAMPLE = """
        SELECT a.application_name AS app, regexp_replace(left(a.query, 300), '\\s+', ' ', 'g') AS query,
               a.wait_event_type, a.wait_event,
               (SELECT string_agg(coalesce(b.application_name, '') || ': ' ||
                                  regexp_replace(left(b.query, 120), '\\s+', ' ', 'g'), ' | ')
                FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))) AS blockers
        FROM pg_stat_activity a
        WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.state = 'active'
          AND (a.application_name IN (%s, %s) OR a.backend_type = 'autovacuum worker')
          AND a.query NOT ILIKE '%%pg_try_advisory_lock%%'
    """

    def __init__(self, url: str, inserter: Inserter, every: float = 0.01, report_every: float = 3.0) -> None:
        self.url, self.inserter, self.every, self.report_every = url, inserter, every, report_every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.started = time.perf_counter()
        self.timeline: list[tuple[float, str]] = []  # (when, runner's statement) at each change
        self.lock_waits: list[tuple[float, str, str]] = []  # (when, inserter's wait event, blockers)
        self.autovacuum: list[tuple[float, str]] = []  # (when, what an autovacuum worker was doing)

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        next_report = self.started + self.report_every
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.wait(self.every):
                now = time.perf_counter()
                runner = "(runner between statements, or not running)"
                for r in conn.execute(self.SAMPLE, (MIGRATE_APP_NAME, INSERTER_APP_NAME)).fetchall():
                    if r[0] == MIGRATE_APP_NAME:
                        runner = r[1]
                    elif r[0] == INSERTER_APP_NAME:
                        if r[2] == "Lock":
                            self.lock_waits.append((now, r[3], r[4] or "?"))
                    else:
                        self.autovacuum.append((now, r[1]))
                if not self.timeline or self.timeline[-1][1] != runner:
                    self.timeline.append((now, runner))
                if now >= next_report:
                    next_report = now + self.report_every
                    doing = self.timeline[-1][1][:80] if self.timeline else "-"
                    log(
                        f"    {now - self.started:6.1f} s  inserts so far: {self.inserter.count.value:>7,}"
                        f"  runner: {doing}"
                    )

    def statement_at(self, when: float) -> str:
        current = "-"
        for t, q in self.timeline:
            if t > when:
                break
            current = q
        return current


async def run_migrations(url: str, versions: list[str], timings: dict[str, tuple[int, float]]) -> None:
    starts: dict[str, float] = {}

    def on_start(m: migrate.Migration) -> None:
        starts[m.version] = time.perf_counter()
        log(f"  applying {m.filename} ...")

    def on_done(m: migrate.Migration, ms: int) -> None:
        wall = time.perf_counter() - starts[m.version]
        timings[m.version] = (ms, wall)
        log(f"  {m.filename} done: {ms / 1000:.2f} s")

    for v in versions:
        applied = await migrate.migrate(url, v, on_start=on_start, on_done=on_done)
        assert [m.version for m in applied] == [v], f"expected to apply {v}, applied {applied}"


def verify_rows(url: str, rows: int, inserted: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        total, nulls, on_default = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE tenant_id IS NULL),
                      count(*) FILTER (WHERE tenant_id = %s) FROM knowledge_base""",
            (DEFAULT_TENANT,),
        ).fetchone()
        live_nulls = conn.execute(
            "SELECT count(*) FROM knowledge_base WHERE title LIKE 'Note live %' AND tenant_id IS NULL"
        ).fetchone()[0]
        not_null = conn.execute(
            """SELECT attnotnull FROM pg_attribute
               WHERE attrelid = 'knowledge_base'::regclass AND attname = 'tenant_id'"""
        ).fetchone()[0]
        invalid = conn.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone()[0]
    log(f"  knowledge_base rows: {total:,} (expected {rows:,} + {inserted:,} = {rows + inserted:,})")
    log(f"  tenant_id NULL: {nulls} (of which inserted live: {live_nulls}); on system-default: {on_default:,}")
    log(f"  tenant_id NOT NULL: {not_null}; invalid indexes: {invalid}")
    return total == rows + inserted and nulls == 0 and on_default == total and not_null and invalid == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in knowledge_base (default 1,000,000)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="admin URL of the server (default: DATABASE_URL, else the embedded PostgreSQL)",
    )
    parser.add_argument("--baseline-seconds", type=float, default=5.0, help="inserter baseline before migrating")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on the migration after this long")
    args = parser.parse_args()

    settings = Settings()
    server_url = args.database_url or server.admin_conninfo(settings)
    with psycopg.connect(server_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    name, url = create_database(server_url, "iaf_bench_migrate")
    log(f"PostgreSQL {version}, database {name}")
    ok = False
    try:
        t0 = time.perf_counter()
        all_migrations = {m.version: m for m in migrate.discover()}
        asyncio.run(run_migrations(url, ["001", "002", "003", "004", "005"], {}))
        log(f"Filling knowledge_base with {args.rows:,} rows ...")
        fill(url, args.rows)

        inserter = Inserter(url)
        os.environ["PGAPPNAME"] = MIGRATE_APP_NAME  # lets the monitor find the runner's sessions
        timings: dict[str, tuple[int, float]] = {}
        try:
            inserter.start()
            # The monitor samples during the baseline too, so both windows are measured alike.
            with Monitor(url, inserter) as monitor:
                log(f"Baseline: the single-tenant application inserts for {args.baseline_seconds:.0f} s ...")
                baseline_start = time.perf_counter()
                inserter.stop.wait(args.baseline_seconds)  # a pause: the inserter works meanwhile
                baseline_end = mig_start = time.perf_counter()
                log("Migrating 006 and 007 with the real runner, the application still inserting ...")
                try:
                    asyncio.run(asyncio.wait_for(run_migrations(url, ["006", "007"], timings), args.timeout))
                finally:
                    mig_end = time.perf_counter()
        finally:
            inserter.finish()
            del os.environ["PGAPPNAME"]

        before = inserter.between(baseline_start, baseline_end)
        during = inserter.between(mig_start, mig_end)
        inserted = len(inserter.samples)
        log("")
        log("Results")
        log(f"  server                  PostgreSQL {version}")
        log(f"  rows in knowledge_base  {args.rows:,}")
        log(f"  migration total         {mig_end - mig_start:.2f} s (006 + 007, wall clock)")
        for v, (ms, _wall) in sorted(timings.items()):
            log(f"    {all_migrations[v].filename:<40} {ms / 1000:7.2f} s")
        log(f"  inserts before          {len(before):,} in {baseline_end - baseline_start:.1f} s   {stats_ms(before)}")
        log(f"  inserts during          {len(during):,} in {mig_end - mig_start:.1f} s   {stats_ms(during)}")
        if before and during:
            log(
                f"  max during / max before {max(during) / max(before):.1f}x   "
                f"(p99 {percentile(during, 0.99) / percentile(before, 0.99):.1f}x)"
            )
        slowest = sorted(((lat, t) for t, lat in inserter.samples if mig_start <= t < mig_end), reverse=True)[:5]
        log("  slowest inserts during the migration (when, and the runner's statement then, sampled):")
        for lat, t in slowest:
            log(f"    {lat * 1000:9.3f} ms at +{t - mig_start:5.2f} s   {monitor.statement_at(t + lat)[:110]}")
        blockers: dict[str, int] = {}
        waits = [w for w in monitor.lock_waits if mig_start <= w[0] < mig_end]
        for _, event, who in waits:
            blockers[f"{event} <- {who}"[:150]] = blockers.get(f"{event} <- {who}"[:150], 0) + 1
        log(
            f"  inserter seen waiting for a lock in {len(waits)} samples during the migration "
            f"(one every {monitor.every * 1000:.0f} ms)" + (":" if blockers else "")
        )
        for who, n in sorted(blockers.items(), key=lambda kv: -kv[1])[:5]:
            log(f"    {n:5} x {who}")
        vacuums = sorted({q for t, q in monitor.autovacuum if mig_start <= t < mig_end})
        log(f"  autovacuum seen during the migration: {', '.join(vacuums) if vacuums else 'none'}")
        log(
            f"  insert errors           {len(inserter.errors)}"
            + (f" (first: {inserter.errors[0]})" if inserter.errors else "")
        )
        log("Checking every row ...")
        ok = verify_rows(url, args.rows, inserted) and not inserter.errors
        log(f"  {'OK' if ok else 'FAILED'}; whole run {time.perf_counter() - t0:.1f} s")
    finally:
        drop_database(server_url, name)
        log(f"Dropped database {name}.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
