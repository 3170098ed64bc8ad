"""A/B of app.search_passages against an earlier migration's definition, same database, same session, calls interleaved.

    python bench/search_ab.py ADMIN_URL [--queries 80] [--broad 40] [--rounds 3] [--old-sql FILE | --unsampled]
                                     [--bucket large] [--passages 60000 --tenants 100 --huge 0 --huge-size 200000]

ADMIN_URL: a database kept by `bench/retrieval.py --keep` (same --passages/--tenants/--seed, to find its
5,000-passage tenant (or --bucket's median tenant) and generate its queries the same way). The old definition (038's migration by
default) is created under another name, app.bench_search_old, in that database only; the new one is the
migrated app.search_passages (the latest migration's). Both are called by the application role inside the tenant's transaction,
alternately per query and mode; p50/p95 per mode, for the bench's query mix and for broad queries (one or
two of the tenant's most common topic words), and how often the two return the same top 10.

--new-sql FILE / --new-unsampled: the same for "new" (by default the migrated function).
--unsampled: "old" is the latest function without the keyword side's sample (every match ranked, not
the first 5,000 found; the 500 best by ts_rank still re-ranked by cover density): the top-10 overlap
is then how much of the full keyword ranking the sampled one keeps, and the ratio what that costs.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

from _common import percentile
from iafactory.config import Settings
from iafactory.knowledge.search import SEARCH_SQL
from retrieval import LANGUAGES, MODES, Embeddings, Query, Tenant, Vocabulary, make_layout, make_query

MIGRATIONS = Path(__file__).parent.parent / "src/iafactory/db/migrations"
OLD = MIGRATIONS / "038_knowledge_search_read_less.sql"


def latest_edited(*edits: tuple[str, str, int]) -> str:
    """The latest migration's text with each (text, replacement, how many times it must stand there)
    made: a variant of the migrated search function, failing loudly once a later migration moves
    what it edits."""
    latest = max(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql"))
    text = latest.read_text()
    for needle, replacement, times in edits:
        if text.count(needle) != times:
            raise SystemExit(f"{latest.name}: expected {times} of {needle.strip()[:60]!r}")
        text = text.replace(needle, replacement)
    return text


def unsampled() -> str:
    """The latest migration's app.search_passages with every match ranked (no LIMIT 5000)."""
    return latest_edited(("LIMIT 5000", "LIMIT 2147483647", 2))


def compare_with(admin: str, old_text: str, argv: list[str]) -> None:
    """main() with `old_text` as the old definition (for the experiments that build a variant)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(old_text)
        f.flush()
        main([admin, "--old-sql", f.name, *argv])


def create_variant(conn: psycopg.Connection, text: str, name: str) -> str:
    """The definition in `text` created as app.<name>, owned and granted like app.search_passages;
    returns SEARCH_SQL calling it."""
    m = re.search(r"CREATE OR REPLACE FUNCTION (app\.search_(?:knowledge|passages))\(.*?\n\$\$;", text, re.S)
    if not m:
        raise SystemExit(f"no app.search_knowledge or app.search_passages in the definition for {name}")
    conn.execute(m.group(0).replace(m.group(1) + "(", f"app.{name}(", 1))
    owner = conn.execute(
        "SELECT proowner::regrole::text FROM pg_proc WHERE oid = 'app.search_passages'::regproc"
    ).fetchone()[0]
    conn.execute(f"ALTER FUNCTION app.{name} OWNER TO {owner}")
    conn.execute(f"GRANT EXECUTE ON FUNCTION app.{name} TO {Settings().app_db_user}")
    return SEARCH_SQL.replace("app.search_passages", f"app.{name}")


def definition(path: Path | None, unsampled_: bool) -> str | None:
    return unsampled() if unsampled_ else path.read_text() if path else None


def bench_queries(args: argparse.Namespace) -> tuple[Tenant, list[Query], list[Query]]:
    """The bucket's median tenant of retrieval.py's layout (large: the 5,000-passage one), the bench's
    query mix for it, and broad queries: one or two of its most common topic words."""
    rng = np.random.default_rng(args.seed)
    layout = make_layout(args.passages, args.tenants, rng, [args.huge_size] * args.huge)
    emb = Embeddings(rng)
    vocabs = {lang: Vocabulary(lang) for lang in LANGUAGES}
    in_bucket = sorted(layout.bucket(args.bucket), key=lambda t: t.size)
    tenant = in_bucket[len(in_bucket) // 2]
    qrng = np.random.default_rng(args.seed + 1)
    mix = [make_query(qrng, tenant, vocabs, emb) for _ in range(args.queries)]
    vocab = vocabs[tenant.language]
    broad = []
    for i in range(args.broad):
        topic = int(tenant.topics[i % len(tenant.topics)])
        first = vocab.by_topic[topic][: 1 + i % 2 + (i // 2) % 2]
        q = make_query(qrng, tenant, vocabs, emb)
        broad.append(Query(tenant, " ".join(vocab.words[j] for j in first[-(1 + i % 2) :]), q.vector, q.literal))
    return tenant, mix, broad


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """retrieval.py's layout options (to find the tenant and make its queries as it did) and the queries'."""
    parser.add_argument("--passages", type=int, default=60000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--huge", type=int, default=0, help="as retrieval.py's: tenants of --huge-size passages")
    parser.add_argument("--huge-size", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--broad", type=int, default=40)
    parser.add_argument("--bucket", default="large", help="small, medium, large or huge: its median tenant")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("admin")
    add_layout_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--modes",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(MODES),
        help="comma-separated (default: all; keyword alone where semantic search is an exact scan of real[])",
    )
    parser.add_argument("--old-sql", type=Path, default=OLD)
    parser.add_argument("--unsampled", action="store_true", help="old: the latest function, every keyword match ranked")
    parser.add_argument("--new-sql", type=Path, default=None, help="new: this definition instead of the migrated one")
    parser.add_argument("--new-unsampled", action="store_true", help="new: the latest function, every match ranked")
    args = parser.parse_args(argv)
    tenant, mix, broad = bench_queries(args)
    times: dict[tuple[str, str, str], list[float]] = {}
    same: dict[tuple[str, str], list[float]] = {}
    with psycopg.connect(args.admin, autocommit=True) as conn:
        old_sql = create_variant(conn, definition(args.old_sql, args.unsampled) or "", "bench_search_old")
        new_text = definition(args.new_sql, args.new_unsampled)
        new_sql = create_variant(conn, new_text, "bench_search_new") if new_text else SEARCH_SQL
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL ROLE {Settings().app_db_user}")
                conn.execute(f"SET LOCAL app.tenant_id = '{tenant.id}'")
                for r in range(args.rounds + 1):  # the first round warms
                    for kind, queries in (("mix", mix), ("broad", broad)):
                        for q in queries:
                            for mode in args.modes:
                                params = q.params(mode)
                                answers = {}
                                for which, statement in (("old", old_sql), ("new", new_sql))[:: 1 if r % 2 else -1]:
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
            conn.execute("DROP FUNCTION IF EXISTS app.bench_search_old, app.bench_search_new")
    print(
        f"tenant {tenant.id}: {tenant.size} passages ({tenant.language}); {args.rounds} rounds; "
        f"shared_buffers {shared_buffers}; load {os.getloadavg()}"
    )
    print("| queries | mode | old p50 / p95 ms | new p50 / p95 ms | p50 ratio | top-10 overlap |")
    print("|---|---|---|---|---|---|")
    for kind in ("mix", "broad"):
        for mode in args.modes:
            old, new = times[(kind, mode, "old")], times[(kind, mode, "new")]
            o50, n50 = percentile(old, 0.5) * 1e3, percentile(new, 0.5) * 1e3
            print(
                f"| {kind} | {mode} | {o50:.1f} / {percentile(old, 0.95) * 1e3:.1f} | "
                f"{n50:.1f} / {percentile(new, 0.95) * 1e3:.1f} | {n50 / o50:.2f} | "
                f"{np.mean(same[(kind, mode)]):.3f} |"
            )


if __name__ == "__main__":
    main()
