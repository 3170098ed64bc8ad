"""Search a tenant's knowledge base. The SQL is one call to app.search_knowledge(), a definer
function that takes the tenant only from the transaction (never from an argument) and fuses the
full-text and vector rankings (reciprocal rank fusion) in one statement."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from iafactory.db.scope import Transaction
from iafactory.knowledge.embeddings import Embedder, vector_literal
from iafactory.knowledge.schemas import SearchIn
from iafactory.knowledge.text import detect_language, fold, ts_config

SEARCH_SQL = "SELECT * FROM app.search_knowledge(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
# The constant of app.search_knowledge's fusion: a passage at rank r of a ranking adds 1 / (RRF_K + r).
RRF_K = 60


def relevance(score: float, rankings: int) -> float:
    """The fused score as a share of the best possible one (rank 1 in each of `rankings`), in [0, 1]."""
    return round(min(1.0, score * (RRF_K + 1) / rankings), 4) if rankings else 0.0


async def search(tx: Transaction, embedder: Embedder, request: SearchIn) -> dict[str, Any]:
    mode = request.mode
    vector = None
    if mode in ("hybrid", "semantic"):
        vector = vector_literal(await embedder.embed_query(request.query))
    config = ts_config(request.language or detect_language(request.query))
    rows = await tx.fetch(SEARCH_SQL, (
        fold(request.query), config, vector, embedder.model_id, request.k, mode, request.document_ids,
        request.language, Jsonb(request.metadata) if request.metadata else None))
    # The rankings fused: the keyword one unless semantic mode; the vector one when the query has a vector.
    rankings = (mode != "semantic") + (vector is not None)
    passages = [{
        "document_id": r["document_id"], "title": r["title"], "chunk_no": r["chunk_no"], "text": r["content"],
        "char_start": r["char_start"], "char_end": r["char_end"], "heading_path": r["heading_path"],
        "language": r["language"], "score": r["score"], "relevance": relevance(r["score"], rankings),
        "retrievers": [name for name, rank in (("keyword", r["keyword_rank"]), ("semantic", r["semantic_rank"]))
                       if rank is not None],
    } for r in rows]
    return {"query": request.query, "mode": mode, "embedding_model": embedder.model_id, "passages": passages}
