"""A/B of app.search_passages against an earlier migration's definition, same database, same session, calls interleaved.

    python bench/search_ab.py ADMIN_URL [--queries 80] [--broad 40] [--rounds 3] [--old-sql FILE | --unsampled]
                                     [--bucket large] [--passages 60000 --tenants 100 --huge 0 --huge-size 200000]

ADMIN_URL: a database kept by `bench/retrieval.py --keep` (same --passages/--tenants/--seed, to find its
5,000-passage tenant (or --bucket's median tenant) and generate its queries the same way). The old definition (038's migration by
default) is created under another name, app.bench_search_old, in that database only; the new one is the
migrated app.search_passages (the latest migration's). Both are called by the application role inside the tenant's transaction,
alternately per query and mode; p50/p95 per mode, for the bench's query mix and for broad queries (one or
two of the tenant's most common topic words), and how often the two return the same top 10.

--unsampled: "old" is the latest function without the keyword side's sample (every match ranked, not
the first 5,000 found; the 500 best by ts_rank still re-ranked by cover density): the top-10 overlap
is then how much of the full keyword ranking the sampled one keeps, and the ratio what that costs.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import psycopg

from _common import percentile
from iafactory.config import Settings
from iafactory.knowledge.search import SEARCH_SQL
from retrieval import LANGUAGES, MODES, Embeddings, Query, Vocabulary, make_layout, make_query

OLD = Path(__file__).parent.parent / "src/iafactory/db/migrations/038_knowledge_search_read_less.sql"


def unsampled() -> str:
    """The latest migration's app.search_passages with every match ranked (no LIMIT 5000)."""
    latest = max((OLD.parent).glob("[0-9][0-9][0-9]_*.sql"))
    text = latest.read_text()
    if text.count("LIMIT 5000") != 2:
        raise SystemExit(f"{latest.name}: expected the keyword side's two LIMIT 5000")
    return text.replace("LIMIT 5000", "LIMIT 2147483647")


def create_old(conn: psycopg.Connection, text: str) -> None:
    m = re.search(r"CREATE OR REPLACE FUNCTION (app\.search_(?:knowledge|passages))\(.*?\n\$\$;", text, re.S)
    if not m:
        raise SystemExit("no app.search_knowledge or app.search_passages in the old definition")
    conn.execute(m.group(0).replace(m.group(1) + "(", "app.bench_search_old(", 1))
    owner = conn.execute(
        "SELECT proowner::regrole::text FROM pg_proc WHERE oid = 'app.search_passages'::regproc"
    ).fetchone()[0]
    conn.execute(f"ALTER FUNCTION app.bench_search_old OWNER TO {owner}")
    conn.execute(f"GRANT EXECUTE ON FUNCTION app.bench_search_old TO {Settings().app_db_user}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("admin")
    parser.add_argument("--passages", type=int, default=60000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--huge", type=int, default=0, help="as retrieval.py's: tenants of --huge-size passages")
    parser.add_argument("--huge-size", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--broad", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old-sql", type=Path, default=OLD)
    parser.add_argument("--unsampled", action="store_true", help="old: the latest function, every keyword match ranked")
    parser.add_argument("--bucket", default="large", help="small, medium, large or huge: its median tenant")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    layout = make_layout(args.passages, args.tenants, rng, [args.huge_size] * args.huge)
    emb = Embeddings(rng)
    vocabs = {lang: Vocabulary(lang) for lang in LANGUAGES}
    in_bucket = sorted(layout.bucket(args.bucket), key=lambda t: t.size)
    tenant = in_bucket[len(in_bucket) // 2]  # the median tenant of the bucket (large: the 5,000-passage one)
    qrng = np.random.default_rng(args.seed + 1)
    mix = [make_query(qrng, tenant, vocabs, emb) for _ in range(args.queries)]
    vocab = vocabs[tenant.language]
    broad = []
    for i in range(args.broad):
        topic = int(tenant.topics[i % len(tenant.topics)])
        first = vocab.by_topic[topic][: 1 + i % 2 + (i // 2) % 2]
        q = make_query(qrng, tenant, vocabs, emb)
        broad.append(Query(tenant, " ".join(vocab.words[j] for j in first[-(1 + i % 2) :]), q.vector, q.literal))
    old_sql = SEARCH_SQL.replace("app.search_passages", "app.bench_search_old")
    times: dict[tuple[str, str, str], list[float]] = {}
    same: dict[tuple[str, str], list[float]] = {}
    with psycopg.connect(args.admin, autocommit=True) as conn:
        create_old(conn, unsampled() if args.unsampled else args.old_sql.read_text())
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL ROLE {Settings().app_db_user}")
                conn.execute(f"SET LOCAL app.tenant_id = '{tenant.id}'")
                for r in range(args.rounds + 1):  # the first round warms
                    for kind, queries in (("mix", mix), ("broad", broad)):
                        for q in queries:
                            for mode in MODES:
                                params = q.params(mode)
                                answers = {}
                                for which, statement in (("old", old_sql), ("new", SEARCH_SQL))[:: 1 if r % 2 else -1]:
                                    t0 = time.perf_counter()
                                    rows = conn.execute(statement, params).fetchall()
                                    if r:
                                        times.setdefault((kind, mode, which), []).append(time.perf_counter() - t0)
                                    answers[which] = [(row[0], row[2]) for row in rows]
                                if r:
                                    overlap = len(set(answers["old"]) & set(answers["new"]))
                                    same.setdefault((kind, mode), []).append(
                                        overlap / len(answers["old"]) if answers["old"] else float(not answers["new"])
                                    )
        finally:
            conn.execute("DROP FUNCTION app.bench_search_old")
    print(
        f"tenant {tenant.id}: {tenant.size} passages ({tenant.language}); {args.rounds} rounds; "
        f"shared_buffers {shared_buffers}; load {os.getloadavg()}"
    )
    print("| queries | mode | old p50 / p95 ms | new p50 / p95 ms | p50 ratio | top-10 overlap |")
    print("|---|---|---|---|---|---|")
    for kind in ("mix", "broad"):
        for mode in MODES:
            old, new = times[(kind, mode, "old")], times[(kind, mode, "new")]
            o50, n50 = percentile(old, 0.5) * 1e3, percentile(new, 0.5) * 1e3
            print(
                f"| {kind} | {mode} | {o50:.1f} / {percentile(old, 0.95) * 1e3:.1f} | "
                f"{n50:.1f} / {percentile(new, 0.95) * 1e3:.1f} | {n50 / o50:.2f} | "
                f"{np.mean(same[(kind, mode)]):.3f} |"
            )


if __name__ == "__main__":
    main()
