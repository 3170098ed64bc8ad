"""A PostgreSQL wire-protocol relay that records the SQL a client sends.

Sits between the application's pool and the real server, passes every byte both ways unchanged,
and reads the client's messages as it goes: simple queries ('Q') and the statements of the
extended protocol ('P', parse). What it records is what reached the server, however the client
library sends it (one message or many, pipeline mode, prepared or not).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from psycopg.conninfo import conninfo_to_dict

SSL_REQUEST, GSS_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102


@dataclass
class WireCapture:
    upstream: str  # conninfo of the real server (host/port or unix socket directory)
    statements: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        params = conninfo_to_dict(self.upstream)
        host = (params.get("host") or "/tmp").split(",")[0]
        port = int(str(params.get("port") or 5432).split(",")[0])
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._connect_upstream()
        except OSError:
            writer.close()
            return
        back = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            await self._client_to_server(reader, up_writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            up_writer.close()
            await asyncio.gather(back, return_exceptions=True)
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Startup: untyped messages (an SSL or GSS request is answered by one byte, then the real
        # startup message follows; the relay refuses neither, the client is told sslmode=disable).
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            body = await reader.readexactly(length - 8)
            writer.write(head + body)
            await writer.drain()
            if code == CANCEL_REQUEST:
                return
            if code not in (SSL_REQUEST, GSS_REQUEST):
                break
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await reader.readexactly(length - 4)
            if kind == b"Q":
                self.statements.append(body[:-1].decode())
            elif kind == b"P":
                name_end = body.index(b"\x00")
                query_end = body.index(b"\x00", name_end + 1)
                self.statements.append(body[name_end + 1 : query_end].decode())
            writer.write(head + body)
            await writer.drain()
            if kind == b"X":
                return
