"""Experiment: a huge tenant's GIN index split into segments by document id, probed in order until the
keyword side's 5,000 matches are found, against 039's one GIN index per tenant.

    python bench/keyword_segments.py ADMIN_URL --segments 8 [search_ab.py's options: --passages 2000000
                                     --tenants 1000 --huge 2 --bucket huge --rounds 3 ...]

Why: a broad query's level probe in a 200,000-passage tenant spends ~17 ms intersecting whole
posting lists (GIN has no ordered scan: a bitmap is complete before its first row is read) to keep
the first 5,000 matches. Split by document id, a LIMIT over a UNION ALL of the segments' bitmap
scans stops before building the later segments' bitmaps.

ADMIN_URL: a database kept by `bench/retrieval.py --keep`. For every tenant with its own GIN index of
at least 20,000 passages, --segments partial GIN indexes (tenant and a document-id range, the
tenant's quantiles; the last one open-ended) are built CONCURRENTLY and listed in a table
bench_keyword_segments; a variant of 039's app.search_passages whose level probe reads them
(bench/search_ab.py --old-sql, so "old" is the variant and "new" 039) is compared, calls
interleaved. The indexes and the table are dropped afterwards. Not part of the product: a
measurement for deciding whether segments are worth building into `iafactory knowledge index-large`.

Measured (`bench/retrieval.py --scale full --keep`'s database: 2,000,000 passages, the German
200,000-passage tenant, 8 segments of ~25,000 built in ~20 s, 3 rounds, quiet machine), p50 ms
039 -> segmented: keyword 20.1 -> 15.9 (bench mix), 22.7 -> 19.4 (broad); hybrid 53.1 -> 49.1,
57.9 -> 54.2; semantic unchanged (33.7 / 34.5). The bitmap work shrinks, but the 5,000 sampled
rows are still read from the heap and ranked, so a quarter of the keyword side at best. And the
top 10 in common with 039's: 0.58 (keyword), 0.77-0.79 (hybrid): at this size a level of the
query's words holds far more than 5,000 passages for most queries, and which 5,000 are ranked
(table order, or the oldest documents' first) decides the answer. Not built: what this tenant size
needs is a keyword structure read in rank order, not a cheaper way to take an arbitrary sample.
"""

from __future__ import annotations

import itertools
import sys
import time
from uuid import UUID

import psycopg

from iafactory.knowledge import large
from search_ab import compare_with, latest_edited

PROBE = """                SELECT array_agg(b.row_version) INTO v_best
                  FROM (SELECT s.row_version
                        FROM (SELECT c.ctid AS row_version, c.document_id, c.chunk_no, ts_rank(c.tsv, v_query) AS rank
                              FROM public.knowledge_chunks c
                              WHERE c.tenant_id = v_tenant AND c.tsv @@ v_strict
                              LIMIT 5000) s
                        ORDER BY s.rank DESC, s.document_id, s.chunk_no
                        LIMIT 500) b;"""

SEGMENTED_PROBE = f"""                IF v_segments IS NULL THEN
{PROBE}
                ELSE
                EXECUTE format(
                    $q$SELECT array_agg(b.row_version)
                         FROM (SELECT s.row_version FROM (SELECT * FROM (%s) u LIMIT 5000) s
                               ORDER BY s.rank DESC, s.document_id, s.chunk_no LIMIT 500) b$q$, v_segments)
                  INTO v_best USING v_query, v_strict;
                END IF;"""

SEGMENTS_OF_TENANT = """            SELECT string_agg(format(
                       '(SELECT c.ctid AS row_version, c.document_id, c.chunk_no, ts_rank(c.tsv, $1) AS rank '
                       'FROM public.knowledge_chunks c WHERE c.tenant_id = %L AND c.document_id >= %s '
                       'AND c.document_id < %s AND c.tsv @@ $2)', v_tenant, g.lo, g.hi), ' UNION ALL ' ORDER BY g.lo)
              INTO v_segments FROM public.bench_keyword_segments g WHERE g.tenant_id = v_tenant;
"""


LEVELS = "        IF v_own_gin AND cardinality(v_words) BETWEEN 2 AND 6 THEN\n"
DECLARE_BEST = "    v_best tid[];"


def variant() -> str:
    """The migrated search function with the segmented probe."""
    return latest_edited(
        (PROBE, SEGMENTED_PROBE, 1),
        (LEVELS, LEVELS + SEGMENTS_OF_TENANT, 1),
        (DECLARE_BEST, "    v_segments text;\n" + DECLARE_BEST, 1),
    )


def own_gin_tenants(conn: psycopg.Connection, at_least: int) -> list[tuple[UUID, int]]:
    """The tenants with their own GIN index (iafactory.knowledge.large) and at least that many passages."""
    found = []
    for (name,) in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'knowledge\\_chunks\\_tsv\\_%'"):
        parsed = large.parse_index_name(name)
        if parsed and parsed[0] == "keyword" and not parsed[2]:
            n = conn.execute("SELECT count(*) FROM knowledge_chunks WHERE tenant_id = %s", (parsed[1],)).fetchone()[0]
            if n >= at_least:
                found.append((parsed[1], n))
    return found


def build(admin: str, segments: int) -> list[str]:
    names = []
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_keyword_segments (tenant_id uuid, lo bigint, hi bigint, index_name text)"
        )
        conn.execute("GRANT SELECT ON bench_keyword_segments TO PUBLIC")
        conn.execute("TRUNCATE bench_keyword_segments")
        for tenant, n in own_gin_tenants(conn, 20_000):
            hex_id = tenant.hex
            bounds = conn.execute(
                """SELECT percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY document_id)
                   FROM knowledge_chunks WHERE tenant_id = %s""",
                ([i / segments for i in range(1, segments)], tenant),
            ).fetchone()[0]
            edges = [0, *bounds, 2**62]
            t0 = time.perf_counter()
            for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
                name = f"bench_seg_{hex_id}_{i}"
                conn.execute(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON knowledge_chunks USING gin (tsv) "
                    f"WHERE tenant_id = '{tenant}' AND document_id >= {lo} AND document_id < {hi}"
                )
                conn.execute("INSERT INTO bench_keyword_segments VALUES (%s, %s, %s, %s)", (tenant, lo, hi, name))
                names.append(name)
            print(f"tenant {tenant}: {n:,} passages, {segments} segments built in {time.perf_counter() - t0:.1f} s")
        conn.execute("ANALYZE knowledge_chunks")
    return names


def drop(admin: str, names: list[str]) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        conn.execute("DROP TABLE IF EXISTS bench_keyword_segments")


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    admin, rest = argv[0], argv[1:]
    segments = 8
    if "--segments" in rest:
        i = rest.index("--segments")
        segments = int(rest[i + 1])
        del rest[i : i + 2]
    names = build(admin, segments)
    try:
        compare_with(admin, variant(), rest)
    finally:
        drop(admin, names)


if __name__ == "__main__":
    main()
