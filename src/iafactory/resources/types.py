"""Field types shared by the resource schemas: bounded JSON and text, so that no request can
store an arbitrarily large value."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_JSON_BYTES = 64 * 1024


def _bounded(value: Any) -> Any:
    if len(json.dumps(value, ensure_ascii=False, default=str).encode()) > MAX_JSON_BYTES:
        raise ValueError(f"must be at most {MAX_JSON_BYTES} bytes of JSON")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
JsonArray = Annotated[list[Any], AfterValidator(_bounded)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
LongText = Annotated[str, Field(max_length=200_000)]
Language = Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$", max_length=8, description="ISO 639 code, e.g. fr")]


class Strict(BaseModel):
    """Unknown fields are refused, `tenant_id` included: the tenant comes from the credential."""

    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """Partial update. Declare non-nullable fields as `name: str = None`: omitted means unchanged,
    an explicit null is refused by validation."""
