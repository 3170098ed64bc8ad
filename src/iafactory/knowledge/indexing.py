"""Indexing one document: chunk, detect language, reuse unchanged embeddings, write the chunks.

Runs in a worker, as the document's tenant: the read and the write are two short tenant
transactions, and the slow part (embedding) happens between them with no transaction open. If the
document changed in the meantime, the write is skipped: the change queued a newer job.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from iafactory.db.scope import Database
from iafactory.knowledge.chunking import Chunk, chunk_text
from iafactory.knowledge.embeddings import Embedder, vector_literal
from iafactory.knowledge.text import detect_language, fold, ts_config
from iafactory.tenancy.context import TenantContext

INSERT_CHUNK = """
    INSERT INTO knowledge_chunks (tenant_id, document_id, chunk_no, content, char_start, char_end, heading_path,
                                  language, ts_config, content_hash, tsv, embedding, embedding_model)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::regconfig, %s,
            setweight(to_tsvector('simple', %s), 'A') || to_tsvector(%s::regconfig, %s) || to_tsvector('simple', %s),
            app.to_embedding(%s), %s)"""


@dataclass(frozen=True)
class IndexResult:
    chunks: int
    embedded: int  # newly embedded (the rest reused their stored vector)
    skipped: bool = False


async def index_document(
    db: Database, embedder: Embedder, tenant_id: UUID, document_id: int, *, force_reembed: bool = False
) -> IndexResult:
    ctx = TenantContext(tenant_id=tenant_id)
    async with db.tenant(ctx) as tx:
        doc = await tx.fetchrow(
            "SELECT id, title, content, language, updated_at FROM knowledge_base WHERE tenant_id = %s AND id = %s",
            (tenant_id, document_id),
        )
        if doc is None:
            return IndexResult(0, 0, skipped=True)  # deleted since: its chunks went with it
        await tx.execute(
            "UPDATE knowledge_base SET index_status = 'indexing' WHERE tenant_id = %s AND id = %s",
            (tenant_id, document_id),
        )
        old = await tx.fetch(
            """SELECT content_hash, embedding::text AS embedding, embedding_model FROM knowledge_chunks
               WHERE tenant_id = %s AND document_id = %s""",
            (tenant_id, document_id),
        )
    reusable = (
        {}
        if force_reembed
        else {
            r["content_hash"]: r["embedding"]
            for r in old
            if r["embedding"] is not None and r["embedding_model"] == embedder.model_id
        }
    )

    chunks = chunk_text(doc["content"] or "") or chunk_text(doc["title"])
    whole = detect_language(doc["content"] or doc["title"])
    detected = [detect_language(chunk.text) for chunk in chunks]
    # What the API shows as the document's language when the client set none.
    detected_language = dominant_language(detected, chunks) or whole
    document_language = doc["language"] or whole
    rows: list[dict[str, Any]] = []
    to_embed: list[int] = []
    for chunk, chunk_language in zip(chunks, detected, strict=True):
        language = chunk_language or document_language
        passage = f"{chunk.heading_path}\n{chunk.text}" if chunk.heading_path else chunk.text
        # The hash covers exactly the text embedded, title included: a new title re-embeds.
        embedded_text = f"{doc['title']}\n{passage}"
        content_hash = hashlib.sha256(embedded_text.encode()).hexdigest()
        rows.append(
            {
                "chunk": chunk,
                "language": language,
                "text": embedded_text,
                "hash": content_hash,
                "embedding": reusable.get(content_hash),
            }
        )
        if rows[-1]["embedding"] is None and embedder.model_id is not None:
            to_embed.append(len(rows) - 1)
    vectors = await embedder.embed_documents([rows[i]["text"] for i in to_embed])
    for i, vector in zip(to_embed, vectors, strict=True):
        rows[i]["embedding"] = vector_literal(vector)

    async with db.tenant(ctx) as tx:
        current = await tx.fetchval(
            "SELECT updated_at FROM knowledge_base WHERE tenant_id = %s AND id = %s", (tenant_id, document_id)
        )
        if current != doc["updated_at"]:
            return IndexResult(len(rows), len(to_embed), skipped=True)
        await tx.execute(
            "DELETE FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s", (tenant_id, document_id)
        )
        for row in rows:
            chunk, config = row["chunk"], ts_config(row["language"])
            folded = fold(f"{chunk.heading_path} {chunk.text}")
            await tx.execute(
                INSERT_CHUNK,
                (
                    tenant_id,
                    document_id,
                    chunk.number,
                    chunk.text,
                    chunk.start,
                    chunk.end,
                    chunk.heading_path,
                    row["language"],
                    config,
                    row["hash"],
                    fold(doc["title"]),
                    config,
                    folded,
                    folded,
                    row["embedding"],
                    embedder.model_id if row["embedding"] else None,
                ),
            )
        # detected_language moves neither updated_at nor the indexing queue (their triggers ignore it).
        await tx.execute(
            """UPDATE knowledge_base SET index_status = 'indexed', indexed_at = now(), index_error = NULL,
                                         detected_language = %s
               WHERE tenant_id = %s AND id = %s""",
            (detected_language, tenant_id, document_id),
        )
    return IndexResult(len(rows), len(to_embed))


def dominant_language(languages: list[str | None], chunks: list[Chunk]) -> str | None:
    """The language detected in most of the text (characters of the chunks where one was detected)."""
    weight: Counter[str] = Counter()
    for language, chunk in zip(languages, chunks, strict=True):
        if language is not None:
            weight[language] += len(chunk.text)
    return max(sorted(weight), key=weight.__getitem__) if weight else None
