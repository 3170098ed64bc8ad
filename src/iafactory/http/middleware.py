"""Request id, body-size limit, and per request: one access-log line (tenant, caller, route
template, status, duration) and the request metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iafactory.http.problems import PROBLEM_JSON
from iafactory.observability import logs, metrics

access_log = logging.getLogger("iafactory.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): cheap, and it can refuse an oversized body while it streams.

    `span_hook(who, route)` (set when tracing is on): called as the response starts, while the
    tracing server span is still open (it ends with the last body message)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 span_hook: Callable[[Mapping[str, Any], str], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
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

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(send_wrapper, request_id)
            else:
                received = 0

                async def receive_limited() -> Message:
                    nonlocal received
                    message = await receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > self.max_body_bytes:
                            raise _BodyTooLarge
                    return message

                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except _BodyTooLarge:
                    await self._too_large(send_wrapper, request_id)
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

    async def _record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float, *,
                      lookup: bool) -> None:
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
        access_log.info("%s %s %s %.1fms", method, route, status, duration_ms, extra={"fields": {
            **who, "method": method, "route": route, "status": status, "duration_ms": duration_ms,
            "client_ip": client[0] if client else None, "plan": plan,
        }})

    async def _too_large(self, send: Send, request_id: str) -> None:
        body = (f'{{"type":"about:blank","title":"Content Too Large","status":413,'
                f'"detail":"request body exceeds {self.max_body_bytes} bytes","request_id":"{request_id}"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
