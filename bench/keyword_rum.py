"""Experiment: a very large tenant's keyword side read in rank order from a RUM index (PostgreSQL
extension `rum`, Debian's postgresql-NN-rum; not in the embedded server), against 039's sample of
the first 5,000 matches and against every match ranked.

    python bench/keyword_rum.py ADMIN_URL [search_ab.py's options: --passages 220000 --tenants 20
                                --huge 1 --bucket huge --rounds 2 ...]

Why: GIN hands matches over in table order, so 039 ranks the first 5,000 found, and in a
200,000-passage tenant that sample decides the answer (`bench/search_ab.py --unsampled`: 0.37 of
the bench mix's keyword top 10 are the full ranking's). RUM keeps the lexemes' positions in the
index and can return `tsv @@ q ORDER BY tsv <=> q` best first, without the heap.

ADMIN_URL: a database kept by `bench/retrieval.py --keep` on a server that has the rum extension.
For every tenant with its own GIN index of at least 20,000 passages a partial RUM index is built
CONCURRENTLY (timed); a variant of 039's app.search_passages takes the 500 best row versions of
the chosen level from it (`ORDER BY tsv <=> query`, RUM's ts_rank-like distance) instead of
ranking the first 5,000 matches by ts_rank, and re-ranks them by cover density as 039 does. Two
runs of bench/search_ab.py: the variant against 039 (time, answers in common) and against every
match ranked (`--new-unsampled`: how much of the full ranking each keeps). The indexes are
dropped afterwards. Not part of the product.

Measured (PostgreSQL 15.20 + rum 1.3, shared_buffers 128 MB; `bench/retrieval.py --passages 220000
--tenants 20 --huge 1 --keep`; `--modes keyword --queries 60 --broad 30 --rounds 2`): the RUM
index 175 MB (the tenant's GIN 33 MB), built in 9.5 s; keyword p50 / p95 ms, RUM variant against
039: 124.5 / 645 vs 114.5 / 158 (mix), 370 / 494 vs 112.5 / 122.5 (broad), top 10 in common with
039 0.40 / 0.06, with every match ranked 1.000 / 1.000 (which took 183 / 217 ms p50). Exact, but
RUM ranks every match before ordering them: no faster than ranking them from the heap.
"""

from __future__ import annotations

import sys
import time

import psycopg

from keyword_segments import PROBE, own_gin_tenants
from search_ab import compare_with, latest_edited

RUM_PROBE = """                SELECT array_agg(b.row_version) INTO v_best
                  FROM (SELECT c.ctid AS row_version
                        FROM public.knowledge_chunks c
                        WHERE c.tenant_id = v_tenant AND c.tsv @@ v_strict
                        ORDER BY c.tsv OPERATOR(public.<=>) v_query
                        LIMIT 500) b;"""

END_LEVELS = "            END LOOP;\n        END IF;"
# One word, or no level with the pool: the hybrid half (or any word), best first as well.
AFTER_LEVELS = """            END LOOP;
        END IF;
        IF v_own_gin AND v_best IS NULL AND v_query IS NOT NULL THEN
            SELECT array_agg(b.row_version) INTO v_best
              FROM (SELECT c.ctid AS row_version
                    FROM public.knowledge_chunks c
                    WHERE c.tenant_id = v_tenant AND c.tsv @@ coalesce(v_enough, v_query)
                      AND (v_need <= 1 OR v_enough IS NOT NULL
                           OR (SELECT count(*) FROM unnest(v_words) AS w (q) WHERE c.tsv @@ w.q) >= v_need)
                    ORDER BY c.tsv OPERATOR(public.<=>) v_query
                    LIMIT 500) b;
        END IF;"""


def variant() -> str:
    return latest_edited((PROBE, RUM_PROBE, 1), (END_LEVELS, AFTER_LEVELS, 1))


def build(admin: str) -> list[str]:
    names = []
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS rum")
        for tenant, n in own_gin_tenants(conn, 20_000):
            name = f"bench_rum_{tenant.hex}"
            t0 = time.perf_counter()
            conn.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON knowledge_chunks "
                f"USING rum (tsv rum_tsvector_ops) WHERE tenant_id = '{tenant}'"
            )
            size = conn.execute(f"SELECT pg_size_pretty(pg_relation_size('{name}'))").fetchone()[0]
            print(f"tenant {tenant}: {n:,} passages, RUM index {size} built in {time.perf_counter() - t0:.1f} s")
            names.append(name)
        conn.execute("ANALYZE knowledge_chunks")
    return names


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    admin, rest = argv[0], argv[1:]
    names = build(admin)
    try:
        for against in ([], ["--new-unsampled"]):
            print(f"== RUM variant (old) against {'every match ranked' if against else 'the migrated function'} (new)")
            compare_with(admin, variant(), [*against, *rest])
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names:
                conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


if __name__ == "__main__":
    main()
