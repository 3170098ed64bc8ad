"""Field types shared by the request schemas: bounded JSON and text, so that no request can
store an arbitrarily large (or deep) value. Every free-form JSON field of every request, resource
or not (tenant settings, usage-event properties, search filters...), is a JsonObject or a
JsonArray: one place holds the rule."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from iafactory import jsonvalues


def _bounded(value: Any) -> Any:
    """Depth, keys, items, string length, finite numbers and total size, with the limits of the
    settings (IAFACTORY_JSON_MAX_*). Checked at validation, so before anything is written."""
    from iafactory.config import get_settings

    jsonvalues.check(value, get_settings().json_limits)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
JsonArray = Annotated[list[Any], AfterValidator(_bounded)]
# A JSON column as read back, when it may hold any JSON (tables older than the API): validated no
# further. pydantic's JsonValue walks the value and fails on a deeply nested one.
StoredJson = Any
Name = Annotated[str, Field(min_length=1, max_length=255)]
LongText = Annotated[str, Field(max_length=200_000)]
Language = Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$", max_length=8, description="ISO 639 code, e.g. fr")]


class Strict(BaseModel):
    """Unknown fields are refused, `tenant_id` included: the tenant comes from the credential."""

    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """Partial update. Declare non-nullable fields as `name: str = None`: omitted means unchanged,
    an explicit null is refused by validation."""
