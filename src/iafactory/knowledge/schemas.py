"""Knowledge base: a tenant's documents for retrieval-augmented generation (the RAG corpus)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, Language, LongText, Patch, Strict

Title = Annotated[str, Field(min_length=1, max_length=500)]
Source = Annotated[
    str, Field(min_length=1, max_length=1000, description="Where the document comes from: a URL or a reference")
]
# Any integer: one outside bigint's range names no document and is dropped by search.prepare (a bound
# in the schema would be 2**63 - 1, which JSON clients read as a float and round past).
DocumentId = int


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
    language: str | None = Field(
        description="The language the client set; if none, the detected one (null until "
        "indexed, or when the text has no recognisable language)"
    )
    detected_language: str | None = Field(description="Detected while indexing: the language of most of the text")
    metadata: dict
    index_status: Literal["pending", "indexing", "indexed", "failed"] = Field(
        description="Chunking and embedding run in the background after each change of the text."
    )
    indexed_at: datetime | None
    index_error: str | None
    created_at: datetime
    updated_at: datetime

    @model_validator(mode="after")
    def _detected_unless_set(self) -> DocumentOut:
        if self.language is None:
            self.language = self.detected_language
        return self


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
    page: int | None = Field(
        default=None, description="For a passage of a paged file (PDF): the page it starts on, from 1; else null"
    )
    page_end: int | None = Field(default=None, description="The page it ends on (the same, or the next one)")
    language: str | None
    score: float = Field(
        description=(
            "Raw reciprocal-rank-fusion score: the sum over the rankings that found the passage of "
            "1 / (60 + its rank there). Results are ordered by it. Its scale is small (at most 2/61 ≈ 0.033 in "
            "hybrid mode, 1/61 ≈ 0.016 otherwise) and depends on the mode: compare it only within one answer."
        )
    )
    relevance: float = Field(
        ge=0,
        le=1,
        description=(
            "`score` divided by the best score possible for this search: 1/61 for each ranking fused (two in "
            "hybrid mode when the query could be embedded, else one). 1.0 = ranked first by every ranking "
            "used; about 0.5 in hybrid mode = first in one ranking and absent from the other. A rank-based "
            "measure, not a probability of being correct."
        ),
    )
    retrievers: list[Literal["keyword", "semantic"]] = Field(description="The rankings that found the passage")


class SearchOut(BaseModel):
    query: str
    mode: SearchMode
    embedding_model: str | None
    passages: list[Passage]


FileMediaType = Literal[
    "application/pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "text/html",
    "text/markdown",
    "text/plain",
]


class FileOut(BaseModel):
    id: int
    document_id: int = Field(description="The document made from the file (GET /knowledge-base/{document_id})")
    filename: str
    media_type: FileMediaType = Field(description="Detected from the content, not from the name or the client")
    size_bytes: int
    sha256: str
    index_status: Literal["pending", "indexing", "indexed", "failed"]
    index_error: str | None
    created_at: datetime


class FileUploadOut(FileOut):
    document: DocumentOut


# The channel indexing workers LISTEN on. A write to a document NOTIFYs it from the request's own
# session (on Citus the trigger that queues the job runs on a worker node, whose NOTIFY the
# coordinator's listeners never hear).
JOBS_CHANNEL = "iafactory_knowledge_jobs"

KNOWLEDGE_BASE = Resource(
    name="knowledge-base",
    table="knowledge_base",
    noun="document",
    tag="knowledge base",
    create=DocumentCreate,
    update=DocumentUpdate,
    read=DocumentOut,
    id_type=int,
    json_columns=frozenset({"metadata"}),
    wakes=JOBS_CHANNEL,
)
