"""Keyset pagination on (created_at, id), newest first. The cursor is opaque to clients."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, Field

from iafactory.http.problems import invalid

T = TypeVar("T")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on the last page.")


def encode(created_at: datetime, ident: object) -> str:
    raw = json.dumps([created_at.isoformat(), str(ident)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, id_type: type) -> tuple[datetime, object]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return datetime.fromisoformat(created), (UUID(ident) if id_type is UUID else id_type(ident))
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise invalid("query.cursor", "not a cursor returned by this API") from err


def page_of(rows: list[dict], limit: int, key: str = "id") -> tuple[list[dict], str | None]:
    """Rows were fetched with limit + 1: the extra row only tells that there is a next page."""
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        return rows, encode(last["created_at"], last[key])
    return rows, None
