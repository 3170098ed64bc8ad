"""Voice: transcriptions of recorded audio, and conversations held by a voice agent."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from iafactory.resources import Resource
from iafactory.resources.types import (
    JsonArray,
    JsonObject,
    Language,
    LongText,
    Patch,
    Strict,
    Timestamp,
    decimal_rules,
)

TranscriptionStatus = Literal["pending", "processing", "completed", "failed"]
Channel = Literal["phone", "web", "whatsapp"]
ConversationStatus = Literal["active", "ended", "failed"]

Title = Annotated[str, Field(max_length=255)]
AudioUrl = Annotated[str, Field(min_length=1, max_length=2000, description="Where the audio file is stored")]
# numeric(10, 2) with a non-negative check: refused here rather than rounded or overflowed there.
Duration = Annotated[Decimal, decimal_rules(10, 2, description="Seconds")]
AgentName = Annotated[str, Field(min_length=1, max_length=100)]
Caller = Annotated[str, Field(min_length=1, max_length=100, description="Phone number or handle of the caller")]


# --- Transcriptions ------------------------------------------------------------------------------


class TranscriptionCreate(Strict):
    title: Title = ""
    audio_url: AudioUrl | None = None
    language: Language | None = None
    duration_seconds: Duration | None = None
    transcript: LongText = ""
    status: TranscriptionStatus = "pending"
    metadata: JsonObject = {}


class TranscriptionUpdate(Patch):
    title: Title = None  # type: ignore[assignment]
    audio_url: AudioUrl | None = None
    language: Language | None = None
    duration_seconds: Duration | None = None
    transcript: LongText = None  # type: ignore[assignment]
    status: TranscriptionStatus = None  # type: ignore[assignment]
    metadata: JsonObject = None  # type: ignore[assignment]


class TranscriptionOut(BaseModel):
    id: UUID
    title: str
    audio_url: str | None
    language: str | None
    duration_seconds: float | None
    transcript: str
    status: TranscriptionStatus
    metadata: dict
    created_at: datetime
    updated_at: datetime


TRANSCRIPTIONS = Resource(
    name="voice/transcriptions",
    table="voice_transcriptions",
    noun="transcription",
    tag="voice",
    create=TranscriptionCreate,
    update=TranscriptionUpdate,
    read=TranscriptionOut,
    json_columns=frozenset({"metadata"}),
    create_responses=(
        (402, "Not enough credits: each transcription costs credits, debited with it (GET /credits/balance)"),
    ),
)


# --- Conversations -------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class ConversationCreate(Strict):
    agent_name: AgentName
    channel: Channel = "web"
    caller: Caller | None = None
    status: ConversationStatus = "active"
    language: Language | None = None
    messages: JsonArray = []
    summary: LongText | None = None
    started_at: Timestamp = Field(default_factory=_now, description="Defaults to now")
    ended_at: Timestamp | None = None


class ConversationUpdate(Patch):
    agent_name: AgentName = None  # type: ignore[assignment]
    channel: Channel = None  # type: ignore[assignment]
    caller: Caller | None = None
    status: ConversationStatus = None  # type: ignore[assignment]
    language: Language | None = None
    messages: JsonArray = None  # type: ignore[assignment]
    summary: LongText | None = None
    started_at: Timestamp = None  # type: ignore[assignment]
    ended_at: Timestamp | None = None


class ConversationOut(BaseModel):
    id: UUID
    agent_name: str
    channel: Channel
    caller: str | None
    status: ConversationStatus
    language: str | None
    messages: list
    summary: str | None
    started_at: datetime
    ended_at: datetime | None
    created_at: datetime
    updated_at: datetime


CONVERSATIONS = Resource(
    name="voice/conversations",
    table="voice_conversations",
    noun="conversation",
    tag="voice",
    create=ConversationCreate,
    update=ConversationUpdate,
    read=ConversationOut,
    json_columns=frozenset({"messages"}),
)
