"""Search a tenant's knowledge base. The SQL is one call to app.search_passages(), a definer
function that takes the tenant only from the transaction (never from an argument) and fuses the
full-text and vector rankings (reciprocal rank fusion) in one statement.

The query is embedded before the search's transaction begins (`prepare`), in the embedding
pool (`CpuWork`, a cap per tenant): no connection is held while the CPU works."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from psycopg.types.json import Jsonb

from iafactory.admission import CpuWork
from iafactory.db.scope import Transaction
from iafactory.knowledge.embeddings import Embedder, vector_literal
from iafactory.knowledge.schemas import SearchIn
from iafactory.knowledge.text import detect_language, fold, ts_config

SEARCH_SQL = "SELECT * FROM app.search_passages(%s, %s, %s, %s, %s, %s, %s::bigint[], %s, %s)"
BIGINT = range(-(2**63), 2**63)
# The constant of app.search_passages's fusion: a passage at rank r of a ranking adds 1 / (RRF_K + r).
RRF_K = 60


def relevance(score: float, rankings: int) -> float:
    """The fused score as a share of the best possible one (rank 1 in each of `rankings`), in [0, 1]."""
    return round(min(1.0, score * (RRF_K + 1) / rankings), 4) if rankings else 0.0


async def prepare(embedder: Embedder, cpu: CpuWork, key: Hashable, request: SearchIn) -> tuple[Any, ...]:
    """Everything the search statement needs but the transaction: the query folded, its text
    search configuration and its embedding (None for a keyword search or without a model).
    `key`: whose share of the embedding pool it uses (the tenant)."""
    vector = None
    if request.mode in ("hybrid", "semantic") and embedder.model_id is not None:
        local = getattr(embedder, "embed_query_sync", None)
        if local is not None:  # computed in this process: a thread of the embedding pool
            vector = vector_literal(await cpu.run(key, local, request.query))
        else:  # a remote service: only the pool's gate applies
            vector = vector_literal(await cpu.run_async(key, embedder.embed_query, request.query))
    config = ts_config(request.language or detect_language(request.query))
    return (
        fold(request.query),
        config,
        vector,
        embedder.model_id,
        request.k,
        request.mode,
        # Ids outside bigint's range name no document (and would make the list numeric[]).
        None if request.document_ids is None else [i for i in request.document_ids if i in BIGINT],
        request.language,
        Jsonb(request.metadata) if request.metadata else None,
    )


async def search(tx: Transaction, embedder: Embedder, request: SearchIn, params: tuple[Any, ...]) -> dict[str, Any]:
    """`params`: from `prepare`, computed before `tx` began."""
    rows = await tx.fetch(SEARCH_SQL, params)
    mode, vector = params[5], params[2]
    # The rankings fused: the keyword one unless semantic mode; the vector one when the query has a vector.
    rankings = (mode != "semantic") + (vector is not None)
    passages = [
        {
            "document_id": r["document_id"],
            "title": r["title"],
            "chunk_no": r["chunk_no"],
            "text": r["content"],
            "char_start": r["char_start"],
            "char_end": r["char_end"],
            "heading_path": r["heading_path"],
            "page": r["page_start"],
            "page_end": r["page_end"],
            "language": r["language"],
            "score": r["score"],
            "relevance": relevance(r["score"], rankings),
            "retrievers": [
                name
                for name, rank in (("keyword", r["keyword_rank"]), ("semantic", r["semantic_rank"]))
                if rank is not None
            ],
        }
        for r in rows
    ]
    return {"query": request.query, "mode": request.mode, "embedding_model": embedder.model_id, "passages": passages}
