"""Experiment: a keyword side read in rank order for a very large tenant — impact-ordered postings
with BM25 weights, each query word's list read from its best passage down and cut at --depth —
against the exhaustive BM25 ranking over the same postings and against 039's function.

    python bench/keyword_impact.py ADMIN_URL [--depth 500,1000,2000] [search_ab.py's layout options:
                                   --passages 2000000 --tenants 1000 --huge 2 --bucket huge ...]

Why: 039's keyword side ranks the first 5,000 matches found (GIN has no ordered scan), and in a
200,000-passage tenant that sample decides the answer (`bench/search_ab.py --unsampled`: 0.37 of
the bench mix's top 10 are the full ranking's). Search engines keep, per term, its passages in
descending order of their contribution to the score, so that a query reads the head of each list.

ADMIN_URL: a database kept by `bench/retrieval.py --keep`. For the bucket's median tenant, an
unlogged table of (lexeme, weight, document_id, chunk_no) from its tsvectors (BM25's term part,
k1 1.2, b 0.75, the passage's length in lexeme positions), an index (lexeme, weight DESC) INCLUDE
(document_id, chunk_no) read index-only, and each lexeme's document frequency. A query's words
are the function's (each word: its stem in the query's language or the word as written, the
better of the two counting); a passage's score is the sum over words of idf x weight. Printed:
build time and size; per depth, p50 / p95 ms of the cut lists and the top-10 overlap with the
exhaustive BM25 ranking (every posting of the query's lexemes); the exhaustive ranking's own time;
and its overlap with 039's keyword top 10 (another ranking function: how far the answers move).
Dropped afterwards. Not part of the product.

Measured (the `--scale full` database: 2,000,000 passages, the German 200,000-passage tenant;
15,818,239 postings, 1.6 GB with the index, built in 40 s; 1 round, 40 + 20 queries, quiet
machine), p50 ms and top-10 overlap with exhaustive BM25, bench mix / broad: 039's function 24.8
/ 24.4 ms, 0.02 / 0.005; every posting 543 / 508 ms; cut at 500 postings a lexeme 4.6 / 3.2 ms,
0.37 / 0.62; 1,000: 7.8 / 5.2, 0.46 / 0.74; 2,000: 15.0 / 10.0, 0.54 / 0.90; 5,000: 37.0 / 24.5,
0.69 / 0.96. Cutting the lists is fast and loses the answer; an exact top k needs block-max
skipping (WAND / MaxScore) inside an index, not SQL over a table.
"""

from __future__ import annotations

import argparse
import time

import psycopg

from _common import percentile
from iafactory.config import Settings
from iafactory.knowledge.search import SEARCH_SQL
from search_ab import add_layout_arguments, bench_queries

WORDS = """
SELECT array_agg(lex.l ORDER BY s.word, lex.l), array_agg(s.word ORDER BY s.word, lex.l)
FROM unnest(tsvector_to_array(to_tsvector('simple', %(text)s))) AS s (word)
CROSS JOIN LATERAL (SELECT unnest(tsvector_to_array(to_tsvector(%(config)s::regconfig, s.word)))
                    UNION SELECT s.word) AS lex (l)
WHERE to_tsvector(%(config)s::regconfig, s.word) <> ''::tsvector
"""

# The query's lexemes with their word and idf; each word's postings (all, or the head of each
# lexeme's list); a word counts once per passage (its better lexeme); the sum over words.
RANK = """
WITH q AS (SELECT l.lexeme, l.word, ln(1 + (%(n)s - d.df + 0.5) / (d.df + 0.5)) AS idf
           FROM unnest(%(lexemes)s::text[], %(words)s::text[]) AS l (lexeme, word)
           JOIN bench_impact_df d ON d.lexeme = l.lexeme),
hits AS (SELECT q.word, p.document_id, p.chunk_no, max(q.idf * p.weight) AS s
         FROM q CROSS JOIN LATERAL (
             SELECT p.document_id, p.chunk_no, p.weight FROM bench_impact p
             WHERE p.lexeme = q.lexeme ORDER BY p.weight DESC LIMIT %(depth)s) p
         GROUP BY 1, 2, 3)
SELECT document_id, chunk_no FROM hits GROUP BY 1, 2 ORDER BY sum(s) DESC, 1, 2 LIMIT 10
"""


def build(conn: psycopg.Connection, tenant: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    conn.execute("DROP TABLE IF EXISTS bench_impact, bench_impact_df")
    n, avg = conn.execute(
        "SELECT count(*), avg(l.len) FROM knowledge_chunks c "
        "CROSS JOIN LATERAL (SELECT sum(greatest(cardinality(u.positions), 1)) AS len FROM unnest(c.tsv) u) l "
        "WHERE c.tenant_id = %s",
        (tenant,),
    ).fetchone()
    conn.execute(
        """CREATE UNLOGGED TABLE bench_impact AS
           SELECT u.lexeme, (u.tf * 2.2 / (u.tf + 1.2 * (0.25 + 0.75 * l.len / %s)))::real AS weight,
                  c.document_id, c.chunk_no
           FROM knowledge_chunks c
           CROSS JOIN LATERAL (SELECT sum(greatest(cardinality(x.positions), 1)) AS len FROM unnest(c.tsv) x) l
           CROSS JOIN LATERAL (SELECT x.lexeme, greatest(cardinality(x.positions), 1) AS tf FROM unnest(c.tsv) x) u
           WHERE c.tenant_id = %s""",
        (float(avg), tenant),
    )
    conn.execute("CREATE INDEX ON bench_impact (lexeme, weight DESC) INCLUDE (document_id, chunk_no)")
    conn.execute(
        "CREATE UNLOGGED TABLE bench_impact_df AS SELECT lexeme, count(*) AS df FROM bench_impact GROUP BY lexeme"
    )
    conn.execute("ALTER TABLE bench_impact_df ADD PRIMARY KEY (lexeme)")
    conn.execute("VACUUM ANALYZE bench_impact")
    conn.execute("VACUUM ANALYZE bench_impact_df")
    rows, size = conn.execute(
        "SELECT count(*), pg_size_pretty(pg_total_relation_size('bench_impact')) FROM bench_impact"
    ).fetchone()
    print(
        f"postings of {n:,} passages: {rows:,} rows, {size} with the index, built in {time.perf_counter() - t0:.0f} s"
    )
    return n, time.perf_counter() - t0, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("admin")
    add_layout_arguments(parser)
    parser.add_argument("--depth", default="500,1000,2000", help="postings read per lexeme, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the postings tables")
    args = parser.parse_args()
    depths = [int(d) for d in args.depth.split(",")]
    tenant, mix, broad = bench_queries(args)
    times: dict[tuple[str, int], list[float]] = {}
    same: dict[tuple[str, int], list[float]] = {}
    with psycopg.connect(args.admin, autocommit=True) as conn:
        n, _, _ = build(conn, str(tenant.id))
        try:
            for r in range(args.rounds + 1):  # the first round warms
                for kind, queries in (("mix", mix), ("broad", broad)):
                    for q in queries:
                        text, config = q.params("keyword")[:2]
                        lexemes, words = conn.execute(WORDS, {"text": text, "config": config}).fetchone()
                        if not lexemes:
                            continue
                        answers: dict[int, list] = {}
                        for depth in [0, *depths][:: 1 if r % 2 else -1]:  # 0: every posting
                            t0 = time.perf_counter()
                            answers[depth] = conn.execute(
                                RANK, {"n": n, "lexemes": lexemes, "words": words, "depth": depth or None}
                            ).fetchall()
                            if r:
                                times.setdefault((kind, depth), []).append(time.perf_counter() - t0)
                        with conn.transaction():
                            conn.execute(f"SET LOCAL ROLE {Settings().app_db_user}")
                            conn.execute(f"SET LOCAL app.tenant_id = '{tenant.id}'")
                            t0 = time.perf_counter()
                            current = [(row[0], row[2]) for row in conn.execute(SEARCH_SQL, q.params("keyword"))]
                            if r:
                                times.setdefault((kind, -1), []).append(time.perf_counter() - t0)
                        if r:
                            exact = set(answers[0])
                            for depth in depths:
                                same.setdefault((kind, depth), []).append(
                                    len(exact & set(answers[depth])) / max(len(exact), 1)
                                )
                            same.setdefault((kind, -1), []).append(len(exact & set(current)) / max(len(exact), 1))
        finally:
            if not args.keep:
                conn.execute("DROP TABLE IF EXISTS bench_impact, bench_impact_df")
    print(f"tenant {tenant.id}: {n:,} passages; {args.rounds} rounds; {len(mix)} + {len(broad)} queries")
    print("| queries | keyword side | p50 / p95 ms | top-10 overlap with exhaustive BM25 |\n|---|---|---|---|")
    for kind in ("mix", "broad"):
        for depth in [-1, 0, *depths]:
            name = {-1: "039's function", 0: "BM25, every posting"}.get(depth, f"BM25, {depth:,} per lexeme")
            t = times[(kind, depth)]
            overlap = "1 (itself)" if depth == 0 else f"{sum(same[(kind, depth)]) / len(same[(kind, depth)]):.3f}"
            print(f"| {kind} | {name} | {percentile(t, 0.5) * 1e3:.1f} / {percentile(t, 0.95) * 1e3:.1f} | {overlap} |")


if __name__ == "__main__":
    main()
