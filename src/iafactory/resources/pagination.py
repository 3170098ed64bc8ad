"""Keyset pagination on (created_at, id), newest first. Clients pass back the cursor they were given."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID

from fastapi import Query
from pydantic import BaseModel, Field

from iafactory.http.problems import invalid

T = TypeVar("T")
IdT = TypeVar("IdT", UUID, int)  # the id types a cursor can carry (CURSOR_PATTERNS)
DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on the last page.")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# "<microseconds since 1970>.<id>": every string of this shape is a position a page can start
# from, so the pattern in the OpenAPI document is exactly what the API accepts.
CURSOR_PATTERNS = {int: r"^[0-9]{1,16}\.[0-9]{1,18}$", UUID: r"^[0-9]{1,16}\.[0-9a-f]{32}$"}


def cursor_param(id_type: type = UUID) -> Any:
    """The `cursor` query parameter of a list whose records have ids of `id_type`."""
    return Annotated[
        str | None,
        Query(pattern=CURSOR_PATTERNS[id_type], max_length=60, description="next_cursor of the previous page"),
    ]


Cursor = cursor_param(UUID)


def encode(created_at: datetime, ident: object) -> str:
    micros = (created_at - EPOCH) // timedelta(microseconds=1)
    return f"{micros}.{ident.hex if isinstance(ident, UUID) else int(ident)}"  # type: ignore[call-overload]


def decode(cursor: str, id_type: type[IdT]) -> tuple[datetime, IdT]:
    if not re.fullmatch(CURSOR_PATTERNS[id_type], cursor):
        raise invalid("query.cursor", "not a cursor returned by this API")
    micros, _, ident = cursor.partition(".")
    return EPOCH + timedelta(microseconds=int(micros)), id_type(ident)  # UUID(hex) or int(digits)


def page_of(rows: list[dict], limit: int, key: str = "id") -> tuple[list[dict], str | None]:
    """Rows were fetched with limit + 1: the extra row only tells that there is a next page."""
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        return rows, encode(last["created_at"], last[key])
    return rows, None
