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


async def search(tx: Transaction, embedder: Embedder, request: SearchIn) -> dict[str, Any]:
    mode = request.mode
    vector = None
    if mode in ("hybrid", "semantic"):
        vector = vector_literal(await embedder.embed_query(request.query))
    config = ts_config(request.language or detect_language(request.query))
    rows = await tx.fetch(SEARCH_SQL, (
        fold(request.query), config, vector, embedder.model_id, request.k, mode, request.document_ids,
        request.language, Jsonb(request.metadata) if request.metadata else None))
    passages = [{
        "document_id": r["document_id"], "title": r["title"], "chunk_no": r["chunk_no"], "text": r["content"],
        "char_start": r["char_start"], "char_end": r["char_end"], "heading_path": r["heading_path"],
        "language": r["language"], "score": r["score"],
        "retrievers": [name for name, rank in (("keyword", r["keyword_rank"]), ("semantic", r["semantic_rank"]))
                       if rank is not None],
    } for r in rows]
    return {"query": request.query, "mode": mode, "embedding_model": embedder.model_id, "passages": passages}
