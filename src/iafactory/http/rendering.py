"""Rendering of every JSON answer of the API: one renderer that cannot fail on stored data.

FastAPI encodes a response model with pydantic, which refuses values nested deeper than 255
levels. A row holding such a value (stored before the request limits existed, or by an operator)
then answered 500 on every read, and a create answered 500 *after* its commit. Here pydantic still
does the work (same validation, same bytes), and when it refuses to encode, the validated value is
encoded again by iafactory.jsonvalues.dumps, which has no depth limit. Every router of the API is
an `api_router()`, whose routes render this way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter
from pydantic_core import to_jsonable_python

from iafactory import jsonvalues

JSON = "application/json"


def _plain(value: Any) -> Any:
    """The validated answer as plain JSON values. Only models and lists of models are walked here
    (a few levels); everything else goes through pydantic, or stays as it is when pydantic refuses
    it for its depth (JSON loaded from the database: dicts, lists, strings, numbers)."""
    if isinstance(value, BaseModel):
        return {
            field.serialization_alias or name: _plain(getattr(value, name))
            for name, field in type(value).model_fields.items()
        }
    if isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value):
        return [_plain(v) for v in value]
    try:
        return to_jsonable_python(value)
    except ValueError:  # "Maximum serialization depth exceeded"
        return value


def render(adapter: TypeAdapter[Any], content: Any) -> bytes:
    """Validate `content` against the response model and encode it."""
    value = adapter.validate_python(content, from_attributes=True)
    try:
        return adapter.dump_json(value)
    except ValueError:  # PydanticSerializationError: "Maximum serialization depth exceeded"
        return jsonvalues.dumps(_plain(value)).encode()


def json_response(adapter: TypeAdapter[Any], content: Any, status_code: int = 200) -> Response:
    return Response(render(adapter, content), status_code=status_code, media_type=JSON)


def _rendering(endpoint: Callable[..., Any], model: Any, status_code: int) -> Callable[..., Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(model)

    @functools.wraps(endpoint)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        result = await endpoint(*args, **kwargs)
        if isinstance(result, Response):
            return result
        return json_response(adapter, result, status_code)

    handler.response_adapter = adapter  # type: ignore[attr-defined]
    return handler


class RenderedRoute(APIRoute):
    """An APIRoute whose handler returns the response already rendered by `render` (FastAPI passes
    a Response through untouched). The response model still documents the route in OpenAPI."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        model = kwargs.get("response_model")
        if (
            model is not None
            and not isinstance(model, DefaultPlaceholder)
            and inspect.iscoroutinefunction(endpoint)
            and not hasattr(endpoint, "response_adapter")
        ):
            endpoint = _rendering(endpoint, model, kwargs.get("status_code") or 200)
        super().__init__(path, endpoint, **kwargs)


def api_router(**kwargs: Any) -> APIRouter:
    """An APIRouter whose routes render with `render`. Every router under /api/v1 is one."""
    return APIRouter(route_class=RenderedRoute, **kwargs)
