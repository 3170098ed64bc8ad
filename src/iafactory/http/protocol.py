"""uvicorn's httptools protocol with the limits it lacks: header size, header count, header time.

uvicorn 0.55 with httptools accepts a 50 MB header or 100,000 headers (buffered in memory until
the line ends) and waits forever for a client that sends half a header: it arms its keep-alive
timer only after a response, and any byte cancels it. This subclass

* refuses a request whose line and headers exceed `max_header_bytes`, counted *before* the
  bytes reach the parser, so memory stays bounded by one socket read: 431 and close;
* refuses more than `max_headers` header lines: 431 and close;
* closes a connection whose next request head is not complete `header_timeout` seconds after
  the connection opened or the previous response ended (408 when part of it had arrived).

The body has its own size and time limits in the ASGI middleware (413 / 408 as problem+json).
We keep httptools rather than h11: h11 bounds the head's size (`h11_max_incomplete_event_size`,
answered with a 400) but has no header timeout either, so a subclass is needed anyway, and
httptools parses faster (README, "HTTP limits", has the measurements). tests/test_http_limits.py
drives each limit through a real `iafactory serve`, so an uvicorn upgrade that moves these hooks
fails there.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

HEAD_END = b"\r\n\r\n"
# After a refusal, what the client still sends is read and dropped for up to this long before the
# connection closes: closing with unread data would reset it, and the client might never see the
# answer ("lingering close", as nginx does).
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal itself is in `_refusal`."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._in_head = True  # waiting for, or reading, a request line and headers
        self._head_bytes = 0
        self._head_tail = b""  # last bytes read, for an end of head split across two reads
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._draining = False

    # --- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        if self._in_head and not self._head_fits(data):
            self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")
            return
        super().data_received(data)

    def _head_fits(self, data: bytes) -> bool:
        window = self._head_tail + data
        end = window.find(HEAD_END)
        if end == -1:
            self._head_bytes += len(data)
            self._head_tail = window[-(len(HEAD_END) - 1) :]
            return self._head_bytes <= self.limits.max_header_bytes
        return self._head_bytes + end + len(HEAD_END) - len(self._head_tail) <= self.limits.max_header_bytes

    # --- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} header fields")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows on this connection is the next request's head.
        self._in_head, self._head_bytes, self._head_tail = True, 0, b""

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        # The parser stops on our callback's exception and uvicorn answers 400: say what it was.
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    # --- limits -------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self._in_head and self._head_bytes:
            self._refuse(408, f"request headers not received within {self.limits.header_timeout:g} s")
        else:
            self.transport.close()  # idle, or still sending a body nobody reads any more

    def _refuse(self, status: int, detail: str) -> None:
        """Answer with problem+json and close: the rest of the stream cannot be trusted."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        title = STATUS_LINE[status].decode().split(" ", 2)[2].strip()
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/problem+json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"x-content-type-options: nosniff\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.logger.warning("refused a request from %s: %s", self.client, detail)
        self.transport.write(b"".join(head))
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
