"""Free-form JSON values (metadata, settings, inputs...): the limits a request's value must keep,
and a loader and an encoder that no nesting depth can break.

Why: a value nested a few hundred levels deep used to be accepted, stored, and then could not be
encoded by pydantic (which stops at 255 levels), so the row's every read answered 500. Requests
now keep the limits below; values stored before (or by an operator's SQL) are still served: the
loader and the encoder here walk with explicit stacks instead of the call stack, so whatever
PostgreSQL stores can be read back and sent.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # exported at run time, not in typeshed
from json.encoder import encode_basestring
from typing import Any

_END = object()


@dataclass(frozen=True)
class JsonLimits:
    depth: int = 32  # nested objects and arrays; {"a": 1} is depth 1
    nbytes: int = 65_536  # UTF-8 bytes of the compact JSON text
    keys: int = 1_000  # keys in one object
    items: int = 10_000  # items in one array
    string: int = 32_768  # characters in one string (keys included)


def _where(trail: Any) -> str:
    """`trail` is (parent trail, key) pairs down from the top (None): e.g. "a.b[3].c"."""
    steps: list[Any] = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    if not steps:
        return "the top level"
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in reversed(steps)).lstrip(".")
    return text if len(text) <= 80 else text[:77] + "..."


def _scalar_error(item: Any, limits: JsonLimits) -> str | None:
    if isinstance(item, str):
        return f"a string longer than {limits.string} characters" if len(item) > limits.string else None
    if isinstance(item, float):
        return None if math.isfinite(item) else f"numbers must be finite, not {item}"
    if item is None or isinstance(item, (bool, int)):
        return None
    return f"not a JSON value: {type(item).__name__}"


def check(value: Any, limits: JsonLimits) -> None:
    """Raise ValueError (naming where, inside the value) unless `value` keeps `limits`.

    Iterative, and it stops at the first container deeper than the limit, so a value nested
    thousands of levels deep costs no more than one nested `limits.depth` levels.
    """
    if not isinstance(value, (dict, list)):
        error = _scalar_error(value, limits)
        if error:
            raise ValueError(f"{error} (at the top level)")
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth, trail = stack.pop()
        if depth > limits.depth:
            raise ValueError(f"nested deeper than {limits.depth} levels (at {_where(trail)})")
        if isinstance(item, dict):
            if len(item) > limits.keys:
                raise ValueError(f"more than {limits.keys} keys in one object (at {_where(trail)})")
            children: Any = item.items()
        else:
            if len(item) > limits.items:
                raise ValueError(f"more than {limits.items} items in one array (at {_where(trail)})")
            children = enumerate(item)
        for key, child in children:
            if isinstance(key, str) and len(key) > limits.string:
                raise ValueError(f"a key longer than {limits.string} characters (at {_where(trail)})")
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1, (trail, key)))
            elif (kind is str and len(child) <= limits.string) or kind is int or kind is bool or child is None:
                continue  # the common cases, without a call
            elif error := _scalar_error(child, limits):
                raise ValueError(f"{error} (at {_where((trail, key))})")
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > limits.nbytes:
        raise ValueError(f"must be at most {limits.nbytes} bytes of JSON (is {size})")


# --- Encoding -------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return encode_basestring(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        # As pydantic does (ser_json_inf_nan='null'): JSON has no NaN or Infinity.
        return float.__repr__(value) if math.isfinite(value) else "null"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def dumps(value: Any) -> str:
    """Compact JSON text of a value made of dicts, lists, strings, numbers, booleans and None,
    however deeply nested (an explicit stack, not recursion)."""
    parts: list[str] = []
    stack: list[tuple[Any, bool, list[bool]]] = []  # (iterator, is an object, [first item pending])

    def start(item: Any) -> None:
        if isinstance(item, dict):
            parts.append("{")
            stack.append((iter(item.items()), True, [True]))
        elif isinstance(item, (list, tuple)):
            parts.append("[")
            stack.append((iter(item), False, [True]))
        else:
            parts.append(_scalar(item))

    start(value)
    while stack:
        iterator, is_object, first = stack[-1]
        item: Any = next(iterator, _END)
        if item is _END:
            parts.append("}" if is_object else "]")
            stack.pop()
            continue
        if first[0]:
            first[0] = False
        else:
            parts.append(",")
        if is_object:
            key, item = item
            parts.append(encode_basestring(str(key)))
            parts.append(":")
        start(item)
    return "".join(parts)


# --- Decoding -------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    """The position after the whitespace at i (the pattern also matches nothing, so it always matches)."""
    match = _WHITESPACE.match(text, i)
    assert match is not None
    return match.end()


_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """`json.loads`, and for a text nested too deeply for it (RecursionError) the same result
    from an iterative parser. Registered as psycopg's JSON loader (iafactory.db.scope)."""
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    try:
        return json.loads(text)
    except RecursionError:
        return _loads_iteratively(text)


def _loads_iteratively(text: str) -> Any:
    i = _skip_ws(text, 0)
    stack: list[list[Any]] = []  # [container, pending key]
    while True:
        # Read one value at i; a container is opened (pushed) and filled by the loop below.
        ch = text[i : i + 1]
        value: Any = _END
        if ch == "{":
            i = _skip_ws(text, i + 1)
            if text[i : i + 1] == "}":
                value, i = {}, i + 1
            else:
                key, i = _key(text, i)
                stack.append([{}, key])
                continue
        elif ch == "[":
            i = _skip_ws(text, i + 1)
            if text[i : i + 1] == "]":
                value, i = [], i + 1
            else:
                stack.append([[], None])
                continue
        elif ch == '"':
            value, i = scanstring(text, i + 1)
        else:
            match = _NUMBER.match(text, i)
            if match:
                integer, fraction, exponent = match.groups()
                value = float(integer + (fraction or "") + (exponent or "")) if fraction or exponent else int(integer)
                i = match.end()
            else:
                word = next((w for w in _LITERALS if text.startswith(w, i)), None)
                if word is None:
                    raise ValueError(f"invalid JSON at character {i}")
                value, i = _LITERALS[word], i + len(word)
        # A complete value: put it in its container; close the containers it completes.
        while True:
            if not stack:
                if text[_skip_ws(text, i) :].strip():
                    raise ValueError(f"extra data after JSON at character {i}")
                return value
            container, key = stack[-1]
            if isinstance(container, dict):
                container[key] = value
            else:
                container.append(value)
            i = _skip_ws(text, i)
            ch = text[i : i + 1]
            if ch == ",":
                i = _skip_ws(text, i + 1)
                if isinstance(container, dict):
                    stack[-1][1], i = _key(text, i)
                break
            if ch != ("}" if isinstance(container, dict) else "]"):
                raise ValueError(f"invalid JSON at character {i}")
            stack.pop()
            value, i = container, i + 1


def _key(text: str, i: int) -> tuple[str, int]:
    """An object's key and the position after its colon (and the whitespace after it)."""
    if text[i : i + 1] != '"':
        raise ValueError(f"invalid JSON at character {i}: expected a key")
    key, i = scanstring(text, i + 1)
    i = _skip_ws(text, i)
    if text[i : i + 1] != ":":
        raise ValueError(f"invalid JSON at character {i}: expected ':'")
    return key, _skip_ws(text, i + 1)
