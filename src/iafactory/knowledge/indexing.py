"""Indexing one document: chunk, detect language, reuse unchanged embeddings, write the chunks.

Runs in a worker, as the document's tenant: the read and the write are two short tenant
transactions, and the slow part (embedding) happens between them with no transaction open. If the
document changed in the meantime, the write is skipped: the change queued a newer job.

A document made from a file (knowledge_files) is indexed from the file, in batches
(`_index_file`): extraction, page by page, feeds the chunker, which feeds batches of FILE_BATCH
passages; each batch is embedded with no transaction open, then written in a short transaction of
its own that replaces the chunks of the same numbers (a rerun after a crash rewrites them, never
duplicates them). Only one batch is held at a time, so the worker's memory does not grow with the
file. The last transaction deletes passages past the new end and marks the document `indexed`;
until then it says `indexing`. A file that cannot be read marks the document `failed` with the
reason (ExtractionError): no retry would change it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any
from uuid import UUID

import anyio.to_thread

from iafactory.db.scope import Database
from iafactory.knowledge import extraction
from iafactory.knowledge.chunking import Chunk, chunk_sections, chunk_text
from iafactory.knowledge.embeddings import Embedder, vector_literal
from iafactory.knowledge.text import detect_language, fold, ts_config
from iafactory.tenancy.context import TenantContext

INSERT_CHUNK = """
    INSERT INTO knowledge_chunks (tenant_id, document_id, chunk_no, content, char_start, char_end, heading_path,
                                  language, ts_config, content_hash, tsv, embedding, embedding_model)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::regconfig, %s,
            setweight(to_tsvector('simple', %s), 'A') || to_tsvector(%s::regconfig, %s) || to_tsvector('simple', %s),
            app.to_embedding(%s), %s)"""


INSERT_FILE_CHUNKS = """
    INSERT INTO knowledge_chunks (tenant_id, document_id, chunk_no, content, char_start, char_end, heading_path,
                                  language, ts_config, content_hash, tsv, embedding, embedding_model,
                                  page_start, page_end)
    VALUES """
FILE_CHUNK_VALUES = """(%s, %s, %s, %s, %s, %s, %s, %s, %s::regconfig, %s,
    setweight(to_tsvector('simple', %s), 'A') || to_tsvector(%s::regconfig, %s) || to_tsvector('simple', %s),
    app.to_embedding(%s), %s, %s::integer, %s::integer)"""

# Passages per batch of a file: embedded together, written in one short transaction.
FILE_BATCH = 32


@dataclass(frozen=True)
class IndexResult:
    chunks: int
    embedded: int  # newly embedded (the rest reused their stored vector)
    skipped: bool = False
    failed: str | None = None  # the file could not be read: the document is `failed` with this reason


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
        file = await tx.fetchrow(
            "SELECT id, media_type, content FROM knowledge_files WHERE tenant_id = %s AND document_id = %s",
            (tenant_id, document_id),
        )
        if file is not None:
            old = []
        else:
            old = await tx.fetch(
                """SELECT content_hash, embedding::text AS embedding, embedding_model FROM knowledge_chunks
                   WHERE tenant_id = %s AND document_id = %s""",
                (tenant_id, document_id),
            )
    if file is not None:
        return await _index_file(db, embedder, ctx, doc, file, force_reembed)
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
        if not await _unchanged(tx, tenant_id, doc):
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
    return _heaviest(weight)


def _heaviest(weight: Counter[str]) -> str | None:
    """The language with the most characters (ties: the first in alphabetical order)."""
    return max(sorted(weight), key=weight.__getitem__) if weight else None


@dataclass
class _Prepared:
    chunk: Chunk
    language: str | None
    text: str  # what is embedded: title, heading path, passage
    hash: str
    embedding: str | None = None


def _next_batch(chunks: Iterator[Chunk], title: str, document_language: str | None) -> list[_Prepared]:
    """The next FILE_BATCH passages, with their language and hash (CPU work: run in a thread)."""
    batch = []
    try:
        taken = list(islice(chunks, FILE_BATCH))
    except extraction.ExtractionError:
        raise
    except Exception as err:
        raise extraction.ExtractionError(f"the file cannot be read ({type(err).__name__}: {err})") from err
    for chunk in taken:
        language = detect_language(chunk.text) or document_language
        passage = f"{chunk.heading_path}\n{chunk.text}" if chunk.heading_path else chunk.text
        text = f"{title}\n{passage}"
        batch.append(_Prepared(chunk, language, text, hashlib.sha256(text.encode()).hexdigest()))
    return batch


async def _index_file(
    db: Database, embedder: Embedder, ctx: TenantContext, doc: dict[str, Any], file: dict[str, Any], force: bool
) -> IndexResult:
    tenant_id, document_id = ctx.tenant_id, doc["id"]
    data: bytes = file["content"]
    chunks = chunk_sections(extraction.sections(data, file["media_type"]))
    weights: Counter[str] = Counter()
    written = embedded = 0
    try:
        while True:
            batch = await anyio.to_thread.run_sync(_next_batch, chunks, doc["title"], doc["language"])
            if not batch:
                break
            if not force and embedder.model_id is not None:
                async with db.tenant(ctx, read_only=True) as tx:
                    stored = await tx.fetch(
                        """SELECT content_hash, embedding::text AS embedding FROM knowledge_chunks
                           WHERE tenant_id = %s AND document_id = %s AND content_hash = ANY(%s)
                             AND embedding_model = %s AND embedding IS NOT NULL""",
                        (tenant_id, document_id, [p.hash for p in batch], embedder.model_id),
                    )
                reuse = {r["content_hash"].strip(): r["embedding"] for r in stored}
                for p in batch:
                    p.embedding = reuse.get(p.hash)
            todo = [p for p in batch if p.embedding is None] if embedder.model_id is not None else []
            # No transaction is open while the batch is embedded.
            for p, vector in zip(todo, await embedder.embed_documents([p.text for p in todo]), strict=True):
                p.embedding = vector_literal(vector)
            embedded += len(todo)
            async with db.tenant(ctx) as tx:
                if not await _unchanged(tx, tenant_id, doc):
                    return IndexResult(written, embedded, skipped=True)
                first, last = batch[0].chunk.number, batch[-1].chunk.number
                await tx.execute(
                    """DELETE FROM knowledge_chunks
                       WHERE tenant_id = %s AND document_id = %s AND chunk_no BETWEEN %s AND %s""",
                    (tenant_id, document_id, first, last),
                )
                # One statement for the batch: the transaction lasts two round trips, not one per passage.
                await tx.execute(
                    INSERT_FILE_CHUNKS + ", ".join([FILE_CHUNK_VALUES] * len(batch)),
                    [v for p in batch for v in _file_chunk_row(tenant_id, document_id, doc, p, embedder)],
                )
            written += len(batch)
            for p in batch:
                if p.language is not None:
                    weights[p.language] += len(p.chunk.text)
        if written == 0:
            raise extraction.ExtractionError(
                "no text found in the file"
                + (
                    ": a PDF without a text layer (a scan?); text recognition (OCR) is not supported"
                    if file["media_type"] == extraction.PDF
                    else ""
                )
            )
    except extraction.ExtractionError as err:
        reason = str(err)[:2000]
        async with db.tenant(ctx) as tx:
            if await _unchanged(tx, tenant_id, doc):
                await tx.execute(
                    "DELETE FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s", (tenant_id, document_id)
                )
                await tx.execute(
                    """UPDATE knowledge_base SET index_status = 'failed', index_error = %s, indexed_at = NULL
                       WHERE tenant_id = %s AND id = %s""",
                    (reason, tenant_id, document_id),
                )
        return IndexResult(written, embedded, failed=reason)
    detected = _heaviest(weights)
    async with db.tenant(ctx) as tx:
        if not await _unchanged(tx, tenant_id, doc):
            return IndexResult(written, embedded, skipped=True)
        await tx.execute(
            "DELETE FROM knowledge_chunks WHERE tenant_id = %s AND document_id = %s AND chunk_no >= %s",
            (tenant_id, document_id, written),
        )
        await tx.execute(
            """UPDATE knowledge_base SET index_status = 'indexed', indexed_at = now(), index_error = NULL,
                                         detected_language = %s
               WHERE tenant_id = %s AND id = %s""",
            (detected, tenant_id, document_id),
        )
    return IndexResult(written, embedded)


async def _unchanged(tx: Any, tenant_id: UUID, doc: dict[str, Any]) -> bool:
    """The document is as it was read: otherwise its change queued a newer job, and this one's
    write is skipped."""
    current = await tx.fetchval(
        "SELECT updated_at FROM knowledge_base WHERE tenant_id = %s AND id = %s", (tenant_id, doc["id"])
    )
    return bool(current == doc["updated_at"])


def _file_chunk_row(
    tenant_id: UUID, document_id: int, doc: dict[str, Any], p: _Prepared, embedder: Embedder
) -> tuple[Any, ...]:
    chunk, config = p.chunk, ts_config(p.language)
    folded = fold(f"{chunk.heading_path} {chunk.text}")
    return (
        tenant_id,
        document_id,
        chunk.number,
        chunk.text,
        chunk.start,
        chunk.end,
        chunk.heading_path,
        p.language,
        config,
        p.hash,
        fold(doc["title"]),
        config,
        folded,
        folded,
        p.embedding,
        embedder.model_id if p.embedding else None,
        chunk.page_start,
        chunk.page_end,
    )
