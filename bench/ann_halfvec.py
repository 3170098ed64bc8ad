"""HNSW over full- or half-precision vectors, same passages, same session: build time, size, p50, recall@10.

    python bench/ann_halfvec.py ADMIN_URL [--passages 100000] [--queries 100] [--ef 400,800] [--m 32]
                                          [--ef-construction 128] [--noise 0.03] [--seed 5]

ADMIN_URL: a database kept by `bench/retrieval.py --keep`. --passages of its largest tenant's vectors
are copied into a scratch table (bench_ann_halfvec, dropped at the end) that gets two HNSW indexes,
one over `vector` (what iafactory.knowledge.large builds) and one over `halfvec` (2 bytes a
dimension instead of 4: the candidate). Queries: stored vectors plus Gaussian noise (--noise per dimension), renormalised.
Each search is what app.search_passages() does with a tenant's index: hnsw.iterative_scan
relaxed_order, 100 candidates from the index, re-ranked by the full-precision cosine distance,
10 kept; recall@10 against an exact scan (no index) of the same table. The two kinds alternate
query by query (which goes first alternates by round); a warm-up round, then two measured.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psycopg

from _common import percentile

TABLE = "bench_ann_halfvec"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("admin")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--ef", default="400,800")
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    with psycopg.connect(args.admin, autocommit=True) as conn:
        tenant, dim = conn.execute(
            """SELECT tenant_id, max(vector_dims(embedding)) FROM knowledge_chunks
               GROUP BY tenant_id ORDER BY count(*) DESC LIMIT 1"""
        ).fetchone()
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(
            f"""CREATE TABLE {TABLE} AS SELECT row_number() OVER () AS id, embedding::vector({dim}) AS embedding
                FROM knowledge_chunks WHERE tenant_id = %s LIMIT {args.passages}""",
            (tenant,),
        )
        try:
            conn.execute(f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id)")
            conn.execute(f"VACUUM ANALYZE {TABLE}")
            n = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
            print(f"{n:,} vectors ({dim}-d) of tenant {tenant}; m {args.m}, ef_construction {args.ef_construction}")
            for kind in ("vector", "halfvec"):
                t0 = time.perf_counter()
                conn.execute(
                    f"CREATE INDEX {TABLE}_{kind} ON {TABLE} USING hnsw ((embedding::{kind}({dim})) {kind}_cosine_ops) "
                    f"WITH (m = {args.m}, ef_construction = {args.ef_construction})"
                )
                size = conn.execute(f"SELECT pg_size_pretty(pg_relation_size('{TABLE}_{kind}'))").fetchone()[0]
                print(f"  {kind:8} build {time.perf_counter() - t0:6.1f} s, {size}")
            rng = np.random.default_rng(args.seed)
            queries = []
            for i in rng.choice(n, min(args.queries, n), replace=False) + 1:
                v = np.array(
                    conn.execute(f"SELECT embedding::real[] FROM {TABLE} WHERE id = %s", (int(i),)).fetchone()[0]
                )
                v = v + rng.standard_normal(dim) * args.noise
                queries.append("[" + ",".join(f"{x:.6f}" for x in v / np.linalg.norm(v)) + "]")
            conn.execute("SET enable_indexscan = off")
            exact = [
                {
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM {TABLE} ORDER BY embedding <=> %s::vector, id LIMIT 10", (q,)
                    )
                }
                for q in queries
            ]
            conn.execute("RESET enable_indexscan")
            conn.execute("SET hnsw.iterative_scan = relaxed_order")
            print("| ef_search | over | p50 ms | p95 ms | recall@10 |\n|---|---|---|---|---|")
            for ef in (int(x) for x in args.ef.split(",")):
                conn.execute(f"SET hnsw.ef_search = {ef}")
                statements = {
                    kind: (
                        f"SELECT id FROM (SELECT id, embedding FROM {TABLE} "
                        f"ORDER BY embedding::{kind}({dim}) <=> %s::{kind}({dim}) LIMIT 100) c "
                        "ORDER BY embedding <=> %s::vector, id LIMIT 10"
                    )
                    for kind in ("vector", "halfvec")
                }
                for kind, statement in statements.items():
                    plan = " ".join(r[0] for r in conn.execute("EXPLAIN " + statement, (queries[0], queries[0])))
                    if f"{TABLE}_{kind}" not in plan:
                        raise SystemExit(f"the {kind} index is not used: {plan}")
                for r in range(3):  # the first round warms the indexes' pages; the two kinds alternate
                    times: dict[str, list[float]] = {kind: [] for kind in statements}
                    recall: dict[str, list[float]] = {kind: [] for kind in statements}
                    for q, best in zip(queries, exact, strict=True):
                        for kind, statement in list(statements.items())[:: 1 if r % 2 else -1]:
                            t0 = time.perf_counter()
                            got = {row[0] for row in conn.execute(statement, (q, q))}
                            times[kind].append(time.perf_counter() - t0)
                            recall[kind].append(len(got & best) / 10)
                    if r == 0:
                        continue
                    for kind in statements:
                        print(
                            f"| {ef} | {kind} | {percentile(times[kind], 0.5) * 1e3:.1f} | "
                            f"{percentile(times[kind], 0.95) * 1e3:.1f} | {np.mean(recall[kind]):.3f} |"
                        )
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


if __name__ == "__main__":
    main()
