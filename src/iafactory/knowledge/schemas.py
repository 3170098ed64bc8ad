"""Knowledge base: a tenant's documents for retrieval-augmented generation (the RAG corpus)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import JsonObject, Language, LongText, Patch, Strict

Title = Annotated[str, Field(min_length=1, max_length=500)]
Source = Annotated[str, Field(min_length=1, max_length=1000, description="Where the document comes from: a URL or a reference")]


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
    created_at: datetime
    updated_at: datetime


KNOWLEDGE_BASE = Resource(name="knowledge-base", table="knowledge_base", noun="document", tag="knowledge base",
                          create=DocumentCreate, update=DocumentUpdate, read=DocumentOut, id_type=int,
                          json_columns=frozenset({"metadata"}))
