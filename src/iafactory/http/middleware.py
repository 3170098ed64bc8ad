"""Request id, body size and time limits, and per request: one access-log line (tenant, caller,
route template, status, duration) and the request metrics."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iafactory.http.problems import PROBLEM_JSON
from iafactory.observability import logs, metrics

access_log = logging.getLogger("iafactory.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): cheap, and it can refuse an oversized body while it streams.

    `span_hook(who, route)` (set when tracing is on): called as the response starts, while the
    tracing server span is still open (it ends with the last body message).

    The body is read here, before the application runs, within `max_body_bytes` and
    `body_timeout` seconds: a declared length over the limit gets 413 at once, a chunked body gets
    413 as soon as it passes the limit (the framework would turn an error while it reads the body
    into a 400), and a body that does not arrive in time gets 408. Every handler reads its whole
    body anyway, so this costs no memory the handler would not have used.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        span_hook: Callable[[Mapping[str, Any], str], None] | None = None,
        body_timeout: float = 30.0,
        upload_paths: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # POST routes that take a file (multipart), with their own body limit; a 413 there names the field `file`.
        self.upload_paths = dict(upload_paths or {})
        self.body_timeout = body_timeout
        self.span_hook = span_hook
        self.plans = metrics.PlanLabels()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        # A caller's id is kept when it is safe to log and to store; otherwise we make one.
        request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Log lines written while this request runs carry its id, and its tenant once known.
        token = logs.bind_state(state)
        # Stays 500 if no response starts: an exception escaped, answered outside this middleware.
        status = {"code": 500}
        escaped = False
        annotated = False

        def annotate_span() -> None:
            nonlocal annotated
            if self.span_hook is not None and not annotated:
                annotated = True
                self.span_hook(logs.context_fields(state), metrics.route_template(scope))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                annotate_span()
            await send(message)

        limit = self.upload_paths.get(scope["path"], self.max_body_bytes)
        field = "file" if scope["path"] in self.upload_paths else None
        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await self._refuse(
                    send_wrapper, request_id, 413, "Content Too Large", f"request body exceeds {limit} bytes", field
                )
            elif (declared is None or declared == b"0") and b"transfer-encoding" not in headers:
                await self.app(scope, receive, send_wrapper)  # no body to wait for (every GET)
            else:
                first = await self._read_body(receive, limit)
                if isinstance(first, tuple):
                    await self._refuse(send_wrapper, request_id, *first, field if first[0] == 413 else None)
                elif first["type"] == "http.disconnect":
                    status["code"] = 499  # the client went away before its body arrived
                else:
                    replayed = False

                    async def receive_buffered() -> Message:
                        nonlocal replayed
                        if not replayed:
                            replayed = True
                            return first
                        return await receive()  # only http.disconnect from here on

                    await self.app(scope, receive_buffered, send_wrapper)
        except BaseException:
            # The error handler outside logs it: leave this request's context bound for that line.
            escaped = True
            annotate_span()
            raise
        finally:
            try:
                await self._record(scope, state, status["code"], time.perf_counter() - started, lookup=not escaped)
            finally:
                if not escaped:
                    logs.unbind(token)

    async def _record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float, *, lookup: bool) -> None:
        """After the response has gone: the plan label (cached; a miss costs one lookup here, not
        on the client's clock; none after an escaped error), the metrics and the access-log line."""
        who = logs.context_fields(state)
        route = metrics.route_template(scope)
        method = scope["method"]
        app_state = getattr(scope.get("app"), "state", None)
        plan = await self.plans.plan(getattr(app_state, "db", None), who.get("tenant_id"), lookup=lookup)
        metrics.observe_request(route, method, status, plan, seconds)
        client = scope.get("client")
        duration_ms = round(seconds * 1000, 1)
        access_log.info(
            "%s %s %s %.1fms",
            method,
            route,
            status,
            duration_ms,
            extra={
                "fields": {
                    **who,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                    "client_ip": client[0] if client else None,
                    "plan": plan,
                }
            },
        )

    async def _read_body(self, receive: Receive, limit: int) -> Message | tuple[int, str, str]:
        """The whole body as one http.request message (or the disconnect), else (status, title, detail)."""
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return 413, "Content Too Large", f"request body exceeds {limit} bytes"
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return 408, "Request Timeout", f"request body not received within {self.body_timeout:g} s"

    async def _refuse(
        self, send: Send, request_id: str, status: int, title: str, detail: str, field: str | None = None
    ) -> None:
        problem: dict[str, Any] = {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "request_id": request_id,
        }
        if field is not None:
            problem["errors"] = [{"field": field, "message": detail, "type": "too_large"}]
        body = json.dumps(problem).encode()
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
        if status == 408:
            headers.append((b"connection", b"close"))  # a client this slow gets no second request
        # After a 413 the server drops the rest of the body; the connection's header timer
        # (http/protocol.py) closes it if the rest takes longer than a request head may.
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
