"""Request id, body-size limit and one access-log line per request naming tenant and caller."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iafactory.http.problems import PROBLEM_JSON

access_log = logging.getLogger("iafactory.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): cheap, and it can refuse an oversized body while it streams."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        # A caller's id is kept when it is safe to log and to store; otherwise we make one.
        request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

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
        state = scope.get("state", {})
        principal = state.get("principal")
        access_log.info(
            "%s %s %s %.1fms request_id=%s tenant=%s user=%s api_key=%s",
            scope["method"], scope["path"], status["code"], (time.perf_counter() - started) * 1000, request_id,
            state.get("tenant_id", "-"), getattr(principal, "user_id", None) or state.get("user_id", "-"),
            getattr(principal, "api_key_id", None) or "-",
        )

    async def _too_large(self, send: Send, request_id: str) -> None:
        body = (f'{{"type":"about:blank","title":"Content Too Large","status":413,'
                f'"detail":"request body exceeds {self.max_body_bytes} bytes","request_id":"{request_id}"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
