"""Field types shared by the request schemas: bounded JSON and text, so that no request can
store an arbitrarily large (or deep) value. Every free-form JSON field of every request, resource
or not (tenant settings, usage-event properties, search filters...), is a JsonObject or a
JsonArray: one place holds the rule."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

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


# --- Values whose schema must say exactly what is accepted -------------------------------------------
# A client generated from the OpenAPI document, or a schema-driven fuzzer, sends what the schema
# allows; these types make the schema and the validation the same rule.

# RFC 3339 with an offset (the JSON Schema "date-time" format), within what Python and PostgreSQL
# store: years 0001-9999, offsets up to 15:59 either way. Pydantic alone would also take numbers
# and digit strings (as Unix times) and a missing offset.
RFC3339 = (
    r"^([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?([Zz]|[+-](0[0-9]|1[0-5]):[0-5][0-9])$"
)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):  # from Python callers (CLI, services)
        if value.tzinfo is None:
            raise ValueError("needs a time zone")
        return value
    if not isinstance(value, str) or not re.fullmatch(RFC3339, value):
        raise ValueError("use an RFC 3339 date-time with a time zone, e.g. 2026-11-01T00:00:00Z")
    return value


@dataclass(frozen=True)
class Rules(annotated_types.GroupedMetadata):
    """Several pydantic annotations as one, so that a parametrised type is written
    `Annotated[Decimal, decimal_rules(14, 2)]`: a type mypy can check (a function returning
    `Annotated[...]` is not one)."""

    items: tuple[Any, ...]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


def timestamp_rules(description: str | None = None) -> Rules:
    """A date-time that must carry its offset, e.g. 2026-11-01T00:00:00Z or 2026-11-01T01:00:00+01:00."""
    schema: dict[str, Any] = {
        "type": "string",
        "format": "date-time",
        "pattern": RFC3339,
        "examples": ["2026-11-01T00:00:00Z"],
    }
    if description:
        schema["description"] = description
    return Rules((BeforeValidator(_rfc3339), WithJsonSchema(schema)))


def timestamp(description: str | None = None) -> Any:
    """`Annotated[datetime, timestamp_rules(description)]`, built at run time (mypy cannot use it as a type)."""
    return Annotated[datetime, timestamp_rules(description)]


Timestamp = Annotated[datetime, timestamp_rules()]


def _number(value: Any) -> Any:
    if isinstance(value, (str, bool)):
        raise ValueError("must be a JSON number")
    return value


def int_rules(*, ge: int | None = None, le: int | None = None) -> Rules:
    """An integer as JSON Schema means it (1 and 1.0), not true/false or "1", which pydantic would take."""
    return Rules((Field(ge=ge, le=le), BeforeValidator(_number)))


def json_int(*, ge: int | None = None, le: int | None = None) -> Any:
    """`Annotated[int, int_rules(...)]`, built at run time (mypy cannot use it as a type)."""
    return Annotated[int, int_rules(ge=ge, le=le)]


def decimal_number(max_digits: int, places: int, *, maximum: int | None = None, description: str | None = None) -> Any:
    """`Annotated[Decimal, decimal_rules(...)]`, built at run time (mypy cannot use it as a type)."""
    return Annotated[Decimal, decimal_rules(max_digits, places, maximum=maximum, description=description)]


def decimal_rules(max_digits: int, places: int, *, maximum: int | None = None, description: str | None = None) -> Rules:
    """A non-negative numeric(max_digits, places) as a JSON number. The schema states the range and
    the step (multipleOf), so a generated value fits the column; strings are refused."""
    step = Decimal(1).scaleb(-places)
    schema: dict[str, Any] = {"type": "number", "minimum": 0, "multipleOf": float(step)}
    if maximum is not None:
        bound = Field(ge=0, le=maximum, max_digits=max_digits, decimal_places=places)
        schema["maximum"] = maximum
    else:  # below 10^(integer digits): an exact bound, where the largest value itself is no float
        bound = Field(ge=0, lt=10 ** (max_digits - places), max_digits=max_digits, decimal_places=places)
        schema["exclusiveMaximum"] = 10 ** (max_digits - places)
    if description:
        schema["description"] = description
    return Rules((BeforeValidator(_number), bound, WithJsonSchema(schema)))


class Strict(BaseModel):
    """Unknown fields are refused, `tenant_id` included: the tenant comes from the credential."""

    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """Partial update. Declare non-nullable fields as `name: str = None`: omitted means unchanged,
    an explicit null is refused by validation."""
