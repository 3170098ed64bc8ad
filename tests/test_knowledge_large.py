"""Large tenants' own search indexes (migration 031, iafactory/knowledge/large.py), with lowered
thresholds: built for a tenant above them and for no other, used by its search (the index scan
counters of the search's own transaction), results as exact search's, never another tenant's
rows, dropped by an erasure, built again by an import. Behaviour only, no timing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from conftest import settings_for, until
from iafactory.db import bootstrap
from iafactory.db.scope import admin_connect
from iafactory.knowledge import large
from iafactory.knowledge.embeddings import vector_literal
from iafactory.knowledge.search import SEARCH_SQL
from iafactory.tenancy import portability
from iafactory.tenancy.context import TenantContext

pytestmark = pytest.mark.anyio

MODEL = "test-model-8d"
DIM = 8
A_SIZE, B_SIZE = 420, 12
THRESHOLD = 300


def _tenant(conn: psycopg.Connection, slug: str) -> uuid.UUID:
    tenant = uuid.uuid4()
    conn.execute(
        "INSERT INTO tenants (id, name, slug, region, plan, status) VALUES (%s, %s, %s, 'CH', 'pro', 'active')",
        (tenant, slug, slug),
    )
    return tenant


def _fill(conn: psycopg.Connection, tenant: uuid.UUID, n: int, rng: np.random.Generator, word: str) -> None:
    """n passages in n // 6 documents, unit vectors, the word `word` in every passage, "zanzibar" in
    the first passage of every tenth document."""
    with conn.transaction():
        conn.execute("SET LOCAL app.bulk_operation = 'on'")
        for d in range(n // 6):
            doc = conn.execute(
                "INSERT INTO knowledge_base (tenant_id, title, content, index_status) "
                "VALUES (%s, %s, 'text', 'indexed') RETURNING id",
                (tenant, f"{word} document {d}"),
            ).fetchone()[0]
            for c in range(6):
                v = rng.standard_normal(DIM)
                text = f"{word} budget passage {d} {c}" + (" zanzibar" if d % 10 == 0 and c == 0 else "")
                conn.execute(
                    """INSERT INTO knowledge_chunks (tenant_id, document_id, chunk_no, content, char_start, char_end,
                           language, ts_config, content_hash, tsv, embedding, embedding_model)
                       VALUES (%s, %s, %s, %s, 0, %s, 'en', 'simple', repeat('0', 64), to_tsvector('simple', %s),
                               app.to_embedding(%s), %s)""",
                    (tenant, doc, c, text, len(text), text, vector_literal(list(v / np.linalg.norm(v))), MODEL),
                )


@pytest.fixture
def world(migrated_db: str) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        a = _tenant(conn, "large-a")
        b = _tenant(conn, "small-b")
        _fill(conn, a, A_SIZE, rng, "alpha")
        _fill(conn, b, B_SIZE, rng, "bravo")
        conn.execute("ANALYZE knowledge_chunks")
        # A few hundred rows: sorting them all is cheaper than any index; at real sizes (bench/retrieval.py)
        # the planner picks the tenant's index by itself. Here it is told to avoid sorting them and reading them all.
        for setting in ("enable_sort", "enable_seqscan"):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = off").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(setting)
                )
            )
        vectors = conn.execute(
            """SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector') >= '0.8'
                      AND format_type(atttypid, atttypmod) = 'vector'
               FROM pg_attribute WHERE attrelid = 'knowledge_chunks'::regclass AND attname = 'embedding'"""
        ).fetchone()[0]
    settings = settings_for(
        migrated_db, knowledge_keyword_index_min_chunks=THRESHOLD, knowledge_vector_index_min_chunks=THRESHOLD
    )
    return {"url": migrated_db, "a": a, "b": b, "settings": settings, "vectors": bool(vectors), "rng": rng}


def indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {
            r[0]
            for r in conn.execute(
                """SELECT indexrelid::regclass::text FROM pg_index
                   WHERE indrelid = 'knowledge_chunks'::regclass AND indisvalid
                     AND indexrelid::regclass::text LIKE 'knowledge\\_chunks\\_%%\\_%%'
                     AND indexrelid::regclass::text ~ '_[0-9a-f]{32}$'"""
            )
        }


def names(tenant: uuid.UUID, vectors: bool) -> set[str]:
    out = {large.index_name(large.KEYWORD_PREFIX, tenant)}
    if vectors:
        out.add(large.index_name(large.VECTOR_PREFIX, tenant))
    return out


async def search(
    world: dict[str, Any],
    tenant: uuid.UUID,
    mode: str,
    vector: str | None,
    query: str = "budget",
    k: int = 10,
    document_ids: list[int] | None = None,
):
    """The search's rows and, in the same transaction, how often each of the tenant's own indexes
    was scanned."""
    async with (
        bootstrap.database(world["settings"], world["url"]) as db,
        db.tenant(TenantContext(tenant_id=tenant), read_only=True) as tx,
    ):
        rows = await tx.fetch(SEARCH_SQL, (query, "simple", vector, MODEL, k, mode, document_ids, None, None))
        scans = {}
        for prefix in (large.KEYWORD_PREFIX, large.VECTOR_PREFIX):
            name = large.index_name(prefix, tenant)
            scans[prefix] = await tx.fetchval(
                "SELECT coalesce(pg_stat_get_xact_numscans(to_regclass(%s)), 0)", ("public." + name,)
            )
    return rows, scans


def query_vector(world: dict[str, Any]) -> str:
    v = world["rng"].standard_normal(DIM)
    literal = vector_literal(list(v / np.linalg.norm(v)))
    assert literal is not None
    return literal


def exact_top(url: str, tenant: uuid.UUID, vector: str, k: int = 10) -> list[tuple[int, int]]:
    with psycopg.connect(url) as conn:
        return [
            (r[0], r[1])
            for r in conn.execute(
                """SELECT document_id, chunk_no FROM knowledge_chunks WHERE tenant_id = %s AND embedding_model = %s
                   ORDER BY app.cosine_distance(embedding, app.to_embedding(%s)), document_id, chunk_no LIMIT %s""",
                (tenant, MODEL, vector, k),
            )
        ]


async def test_indexes_are_built_for_a_large_tenant_only_and_once(world: dict[str, Any]) -> None:
    url, a, b = world["url"], world["a"], world["b"]
    planned = await large.reconcile(url, world["settings"], dry_run=True)
    assert {x.index for x in planned} == names(a, world["vectors"]) and all(x.verb == "create" for x in planned)
    assert indexes(url) == set()  # a dry run changes nothing
    await large.reconcile(url, world["settings"])
    assert indexes(url) == names(a, world["vectors"])
    assert not any(b.hex in name for name in indexes(url))
    assert await large.reconcile(url, world["settings"]) == []  # a second run finds nothing to do
    # Shrinking below the threshold but not below half of it keeps them (no flapping) ...
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET app.bulk_operation = 'on'")
        conn.execute("DELETE FROM knowledge_chunks WHERE tenant_id = %s AND chunk_no >= 4", (a,))  # 280 left
        assert await large.reconcile(url, world["settings"]) == []
        conn.execute("DELETE FROM knowledge_chunks WHERE tenant_id = %s AND chunk_no >= 2", (a,))  # 140 left
        conn.execute("DELETE FROM knowledge_chunks WHERE tenant_id = %s AND chunk_no >= 1", (a,))  # 70 left
    dropped = await large.reconcile(url, world["settings"])
    assert {x.index for x in dropped} == names(a, world["vectors"]) and all(x.verb == "drop" for x in dropped)
    assert indexes(url) == set()


async def test_search_uses_the_large_tenants_indexes_and_exact_search_for_the_small(world: dict[str, Any]) -> None:
    url, a, b = world["url"], world["a"], world["b"]
    with psycopg.connect(url, autocommit=True) as conn:  # others' passages with the word A searches
        _fill(conn, _tenant(conn, "other-c"), 240, world["rng"], "zanzibar")
        conn.execute("ANALYZE knowledge_chunks")
    await large.reconcile(url, world["settings"])
    vector = query_vector(world)
    rows, scans = await search(world, a, "semantic", vector)
    if world["vectors"]:
        assert scans[large.VECTOR_PREFIX] > 0
    # The approximate answer is the exact one on this small set (recall@10 against exact search).
    got = [(r["document_id"], r["chunk_no"]) for r in rows]
    assert len(set(got) & set(exact_top(url, a, vector))) >= 9
    rows, _ = await search(world, a, "keyword", None, "zanzibar")
    assert len(rows) == A_SIZE // 60
    # The tenant's GIN index serves a statement that names the tenant (the search's keyword side
    # does; which index it takes for a few hundred rows is the planner's choice).
    with psycopg.connect(url) as conn:
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT document_id FROM knowledge_chunks WHERE tenant_id = %s AND tsv @@ 'zanzibar'::tsquery",
                (a,),
            )
        )
    assert large.index_name(large.KEYWORD_PREFIX, a) in plan, plan
    rows, _ = await search(world, a, "hybrid", vector)
    assert len(rows) == 10
    # The small tenant: no index of its own; exact search, the exact top 10.
    vector = query_vector(world)
    rows, scans = await search(world, b, "semantic", vector)
    assert scans == {large.KEYWORD_PREFIX: 0, large.VECTOR_PREFIX: 0}
    assert [(r["document_id"], r["chunk_no"]) for r in rows] == exact_top(url, b, vector)


async def test_a_large_tenants_document_filter_still_filters(world: dict[str, Any]) -> None:
    """Migration 038: without filters a tenant with its own GIN index skips the semi-join of its
    keyword matches with its documents (every match is its own); with a document filter it may not.
    k = 50 with the tenant's HNSW index also asks for more than pgvector's largest ef_search (it failed before 038)."""
    url, a = world["url"], world["a"]
    await large.reconcile(url, world["settings"])
    assert large.index_name(large.KEYWORD_PREFIX, a) in indexes(url)
    with psycopg.connect(url) as conn:
        docs = [r[0] for r in conn.execute("SELECT id FROM knowledge_base WHERE tenant_id = %s ORDER BY id", (a,))]
    picked = docs[3:5]
    for mode in ("keyword", "hybrid"):
        rows, _ = await search(world, a, mode, query_vector(world), "alpha budget", k=50)
        assert len({r["document_id"] for r in rows}) > len(picked)  # unfiltered: many documents
        rows, _ = await search(world, a, mode, query_vector(world), "alpha budget", k=50, document_ids=picked)
        assert rows and {r["document_id"] for r in rows} == set(picked), mode


async def test_b_never_gets_as_rows_with_as_indexes_present(world: dict[str, Any]) -> None:
    url, a, b = world["url"], world["a"], world["b"]
    # B large too, so that both have indexes; their passages share every word.
    with psycopg.connect(url, autocommit=True) as conn:
        _fill(conn, b, A_SIZE - B_SIZE, world["rng"], "alpha")
    await large.reconcile(url, world["settings"])
    assert names(a, world["vectors"]) | names(b, world["vectors"]) == indexes(url)
    with psycopg.connect(url) as conn:
        b_docs = {r[0] for r in conn.execute("SELECT id FROM knowledge_base WHERE tenant_id = %s", (b,))}
        a_docs = {r[0] for r in conn.execute("SELECT id FROM knowledge_base WHERE tenant_id = %s", (a,))}
    for _ in range(5):
        vector = query_vector(world)
        for mode in ("hybrid", "keyword", "semantic"):
            for tenant, own in ((b, b_docs), (a, a_docs)):
                rows, _ = await search(world, tenant, mode, vector, "alpha budget")
                assert rows and {r["document_id"] for r in rows} <= own, (mode, tenant)


async def test_erasure_drops_the_indexes_and_import_builds_them_again(world: dict[str, Any], tmp_path: Path) -> None:
    url, a = world["url"], world["a"]
    await large.reconcile(url, world["settings"])
    archive = tmp_path / "large-a.tar.gz"
    await portability.export_tenant(url, "large-a", archive)
    await portability.erase_tenant(url, "large-a", "large-a")
    assert indexes(url) == set()
    await portability.import_tenant(url, archive, settings=world["settings"])
    assert indexes(url) == names(a, world["vectors"])
    rows, scans = await search(world, a, "semantic", query_vector(world))
    assert len(rows) == 10 and (scans[large.VECTOR_PREFIX] > 0 or not world["vectors"])


def index_state(url: str, name: str) -> tuple[bool, list[str], dict] | None:
    """(valid, reloptions, comment) of an index, None when there is none by that name."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            """SELECT x.indisvalid, coalesce(i.reloptions, '{}'), obj_description(i.oid, 'pg_class')::jsonb
               FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid WHERE i.relname = %s""",
            (name,),
        ).fetchone()
    return (row[0], row[1], row[2]) if row else None


def vector_scans_of_a_search(url: str, tenant: uuid.UUID) -> int:
    """How often one semantic search by the application scans the tenant's vector index (sync:
    usable while reconcile() reports a step)."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("SET LOCAL ROLE iaf_app")
        conn.execute(sql.SQL("SET LOCAL app.tenant_id = {}").format(sql.Literal(str(tenant))))
        v = vector_literal([1.0] + [0.0] * (DIM - 1))
        assert (
            len(conn.execute(SEARCH_SQL, ("", "simple", v, MODEL, 10, "semantic", None, None, None)).fetchall()) == 10
        )
        name = large.index_name(large.VECTOR_PREFIX, tenant)
        return conn.execute(
            "SELECT coalesce(pg_stat_get_xact_numscans(to_regclass(%s)), 0)", ("public." + name,)
        ).fetchone()[0]


async def test_a_vector_index_built_with_other_parameters_is_replaced_and_searched_until_then(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade from pgvector's default build (m 16, ef_construction 64: what earlier versions
    built) gets the denser graph at the next run, built beside the old one: when the new graph is
    ready the tenant's searches still use the old one (a build takes most of an hour at 400,000
    passages; without it a semantic search of 270,000 took 585 ms), and then the new one under the same name."""
    if not world["vectors"]:
        pytest.skip("no pgvector >= 0.8 here: no vector index is built")
    url, a = world["url"], world["a"]
    name = large.index_name(large.VECTOR_PREFIX, a)
    monkeypatch.setattr(large, "HNSW_BUILD", dict(large.HNSW_DEFAULTS))
    await large.reconcile(url, world["settings"])
    assert index_state(url, name)[:2] == (True, ["m=16", "ef_construction=64"])
    monkeypatch.undo()
    outdated = "built with m 16, ef_construction 64"
    planned = await large.reconcile(url, world["settings"], dry_run=True)
    assert [(x.verb, x.index, x.reason) for x in planned] == [
        ("create", name + large.NEXT, f"to replace it: {outdated}"),
        ("swap", name, outdated),
    ]
    seen: list[tuple] = []

    def report(action: large.Action) -> None:
        if action.verb == "create":  # the replacement is built, not yet swapped in
            seen.append(
                (index_state(url, name)[:2], index_state(url, name + large.NEXT)[:2], vector_scans_of_a_search(url, a))
            )

    await large.reconcile(url, world["settings"], report=report)
    assert seen == [((True, ["m=16", "ef_construction=64"]), (True, ["m=32", "ef_construction=128"]), 1)]
    valid, options, comment = index_state(url, name)
    assert (valid, options, comment["model"]) == (True, ["m=32", "ef_construction=128"], MODEL)
    assert index_state(url, name + large.NEXT) is None and index_state(url, name + large.RETIRED) is None
    assert indexes(url) == names(a, True)
    assert await large.reconcile(url, world["settings"]) == []
    assert vector_scans_of_a_search(url, a) == 1


async def test_a_tenant_that_changes_model_gets_its_vector_index_replaced(world: dict[str, Any]) -> None:
    if not world["vectors"]:
        pytest.skip("no pgvector >= 0.8 here: no vector index is built")
    url, a = world["url"], world["a"]
    name = large.index_name(large.VECTOR_PREFIX, a)
    await large.reconcile(url, world["settings"])
    with psycopg.connect(url, autocommit=True) as conn:  # re-embedded with another model (same dimension)
        conn.execute("UPDATE knowledge_chunks SET embedding_model = 'test-model-8d-v2' WHERE tenant_id = %s", (a,))
    planned = await large.reconcile(url, world["settings"], dry_run=True)
    outdated = f"built for model {MODEL!r}, not 'test-model-8d-v2'"
    assert [(x.verb, x.index, x.reason) for x in planned] == [
        ("create", name + large.NEXT, f"to replace it: {outdated}"),
        ("swap", name, outdated),
    ]
    await large.reconcile(url, world["settings"])
    assert index_state(url, name)[2]["model"] == "test-model-8d-v2"
    assert indexes(url) == names(a, True) and await large.reconcile(url, world["settings"]) == []


async def test_an_interrupted_replacement_is_cleaned_up_and_erasure_takes_its_leftovers(
    world: dict[str, Any],
) -> None:
    """A run killed during a replacement leaves `…_next` (being built, maybe invalid) or, between
    the swap and the drop, `…_old`: the next run drops them; erasing the tenant drops them too."""
    url, a, b = world["url"], world["a"], world["b"]
    await large.reconcile(url, world["settings"])
    leftovers = [
        large.index_name(prefix, t) + suffix
        for prefix, t, suffix in (
            (large.VECTOR_PREFIX, a, large.NEXT),
            (large.VECTOR_PREFIX, a, large.RETIRED),
            (large.KEYWORD_PREFIX, b, large.NEXT),
        )
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        for leftover in leftovers:
            conn.execute(
                sql.SQL("CREATE INDEX {} ON knowledge_chunks (chunk_no) WHERE tenant_id = {}").format(
                    sql.Identifier(leftover), sql.Literal(str(a if "_ann_" in leftover else b))
                )
            )
    dropped = await large.reconcile(url, world["settings"])
    assert sorted((x.verb, x.index, x.reason) for x in dropped) == sorted(
        ("drop", leftover, "left by an interrupted replacement") for leftover in leftovers
    )
    assert all(index_state(url, leftover) is None for leftover in leftovers)
    assert indexes(url) == names(a, world["vectors"])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE INDEX {} ON knowledge_chunks (chunk_no) WHERE tenant_id = {}").format(
                sql.Identifier(leftovers[1]), sql.Literal(str(a))
            )
        )
    assert sorted(await large.drop_tenant_indexes(url, a)) == sorted(names(a, world["vectors"]) | {leftovers[1]})
    assert index_state(url, leftovers[1]) is None and indexes(url) == set()


async def test_a_build_is_visible_with_its_phase_while_it_waits_for_a_writer(world: dict[str, Any]) -> None:
    """CREATE INDEX CONCURRENTLY first waits for the transactions writing to the table: what
    `index-large` shows the operator (watch_builds) names the index and that phase, and the build
    goes on once the writer ends."""
    url, a = world["url"], world["a"]
    ours = names(a, world["vectors"])  # the first of them is built first
    seen: list[list[dict]] = []
    with psycopg.connect(url) as writer:
        writer.execute("UPDATE knowledge_chunks SET chunk_no = chunk_no WHERE false")  # its lock lasts until rollback
        build = asyncio.create_task(large.reconcile(url, world["settings"]))
        watcher = asyncio.create_task(large.watch_builds(url, seen.append, every=0.01))
        try:
            await until(lambda: any(b["index"] in ours for builds in seen for b in builds), "a build in progress")
        finally:
            writer.rollback()
    done = await build
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    first = next(b for builds in seen for b in builds if b["index"] in ours)
    assert first["index"] == min(ours) and first["phase"] == "waiting for writers before build"
    assert {x.index for x in done} == ours == indexes(url)
    async with await admin_connect(url) as conn:
        assert await large.builds_in_progress(conn) == []  # finished builds are not shown


def _passages(conn: psycopg.Connection, tenant: uuid.UUID, texts: list[str], rng: np.random.Generator) -> None:
    """One document whose passages are `texts`."""
    with conn.transaction():
        conn.execute("SET LOCAL app.bulk_operation = 'on'")
        doc = conn.execute(
            "INSERT INTO knowledge_base (tenant_id, title, content, index_status) VALUES (%s, 'fruit', 'x', 'indexed') "
            "RETURNING id",
            (tenant,),
        ).fetchone()[0]
        for c, text in enumerate(texts):
            v = rng.standard_normal(DIM)
            conn.execute(
                """INSERT INTO knowledge_chunks (tenant_id, document_id, chunk_no, content, char_start, char_end,
                       language, ts_config, content_hash, tsv, embedding, embedding_model)
                   VALUES (%s, %s, %s, %s, 0, %s, 'en', 'simple', repeat('0', 64), to_tsvector('simple', %s),
                           app.to_embedding(%s), %s)""",
                (tenant, doc, c, text, len(text), text, vector_literal(list(v / np.linalg.norm(v))), MODEL),
            )


async def test_a_large_tenants_keyword_side_wants_the_most_of_the_words_that_enough_passages_hold(
    world: dict[str, Any],
) -> None:
    """Migration 036: with its own GIN index, a tenant's keyword ranking reads only the passages
    holding the most of the query's words that at least the pool (40 for k=10) holds, rather than
    every passage sharing one common word; fewer than that, and it relaxes a word at a time."""
    url, a = world["url"], world["a"]
    both = [f"kiwi mango passage {i}" for i in range(45)]
    one = [" ".join(["kiwi"] * 6) + f" passage {i}" for i in range(60)]  # one word, many times
    with psycopg.connect(url, autocommit=True) as conn:
        _passages(conn, a, both + one, world["rng"])
        conn.execute("ANALYZE knowledge_chunks")
    await large.reconcile(url, world["settings"])
    assert large.index_name(large.KEYWORD_PREFIX, a) in indexes(url)

    def words(rows: list[Any]) -> list[set[str]]:
        return [set(r["content"].split()) & {"kiwi", "mango", "zebra"} for r in rows]

    rows, _ = await search(world, a, "keyword", None, "kiwi mango")
    assert len(rows) == 10 and all(w == {"kiwi", "mango"} for w in words(rows)), words(rows)
    # Hybrid: what the keyword side brings (the vector side finds what it finds).
    rows, _ = await search(world, a, "hybrid", query_vector(world), "kiwi mango")
    found = [r for r in rows if r["keyword_rank"] is not None]
    assert found and all(w == {"kiwi", "mango"} for w in words(found)), words(found)
    # No passage holds all three words; 45 hold two of them: those.
    rows, _ = await search(world, a, "keyword", None, "kiwi mango zebra")
    assert len(rows) == 10 and all(len(w) >= 2 for w in words(rows))
    # Only 45 passages hold "mango": fewer than the pool for k=50 (200), so every match is ranked.
    rows, _ = await search(world, a, "keyword", None, "kiwi mango", k=50)
    assert len(rows) == 50 and any(w == {"kiwi"} for w in words(rows))
    # No passage holds "zebra": the keyword side relaxes to any of the words.
    rows, _ = await search(world, a, "keyword", None, "kiwi zebra")
    assert len(rows) == 10 and all(w == {"kiwi"} or w == {"kiwi", "mango"} for w in words(rows))
