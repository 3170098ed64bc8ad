"""Knowledge base: a tenant's documents for retrieval-augmented generation (the RAG corpus)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, Language, LongText, Patch, Strict

Title = Annotated[str, Field(min_length=1, max_length=500)]
Source = Annotated[str, Field(min_length=1, max_length=1000, description="Where the document comes from: a URL or a reference")]
# A document id as PostgreSQL stores it (bigint): larger values are refused by validation rather than
# reaching app.search_knowledge() as numeric[], which matches no signature.
DocumentId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class DocumentCreate(Strict):
    title: Title
    content: LongText = ""
    source: Source | None = None
    language: Language | None = None
    metadata: JsonObject = {}


class DocumentUpdate(Patch):
    title: Title = None  # type: ignore[assignment]
    content: LongText = None  # type: ignore[assignment]
    source: Source | None = None
    language: Language | None = None
    metadata: JsonObject = None  # type: ignore[assignment]


class DocumentOut(BaseModel):
    id: int
    title: str
    content: str
    source: str | None
    language: str | None
    metadata: dict
    index_status: Literal["pending", "indexing", "indexed", "failed"] = Field(
        description="Chunking and embedding run in the background after each change of the text.")
    indexed_at: datetime | None
    index_error: str | None
    created_at: datetime
    updated_at: datetime


SearchMode = Literal["hybrid", "keyword", "semantic"]


class SearchIn(Strict):
    query: str = Field(min_length=1, max_length=2000)
    k: int = Field(default=10, ge=1, le=50, description="How many passages")
    mode: SearchMode = "hybrid"
    document_ids: list[DocumentId] | None = Field(default=None, max_length=1000, description="Only these documents")
    language: Language | None = Field(default=None, description="Only passages in this language")
    metadata: JsonObject | None = Field(default=None, description="Only documents whose metadata contains this object")


class Passage(BaseModel):
    document_id: int
    title: str
    chunk_no: int
    text: str
    char_start: int = Field(description="Offset of the passage in the document's content, for citations")
    char_end: int
    heading_path: str
    language: str | None
    score: float
    retrievers: list[Literal["keyword", "semantic"]]


class SearchOut(BaseModel):
    query: str
    mode: SearchMode
    embedding_model: str | None
    passages: list[Passage]


KNOWLEDGE_BASE = Resource(name="knowledge-base", table="knowledge_base", noun="document", tag="knowledge base",
                          create=DocumentCreate, update=DocumentUpdate, read=DocumentOut, id_type=int,
                          json_columns=frozenset({"metadata"}))
