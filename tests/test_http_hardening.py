"""What the HTTP server does with hostile or careless clients, and the headers on every answer.

The limits are those of a real `iafactory serve` (uvicorn with iafactory/http/protocol.py), driven
with raw sockets: an oversized or over-numerous header block gets 431 without the server's memory
following it, a chunked body over the limit gets 413 problem+json, and a client that stops half-way
through its headers, or its body, is disconnected after the configured (here: short) time.
Every wait on a socket is bounded by a socket timeout, never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api_support import fast_settings
from conftest import SECRET_ENV
from iafactory.app import create_app
from iafactory.db import bootstrap

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): the HTTP server's
# limits and headers, in front of the database.
pytestmark = pytest.mark.server_independent

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_HEADER_BYTES = 16_384
MAX_HEADERS = 100
MAX_BODY = 65_536
WAIT = 15.0  # upper bound on any single wait for the server; a refusal comes much sooner


@dataclass
class LiveServer:
    host: str
    port: int
    proc: subprocess.Popen

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=WAIT)
        sock.settimeout(WAIT)
        return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(module_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_")}
    env.update(
        SECRET_ENV,
        DATABASE_URL=module_db,
        IAFACTORY_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        IAFACTORY_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        IAFACTORY_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        IAFACTORY_MAX_HEADERS=str(MAX_HEADERS),
        IAFACTORY_MAX_BODY_BYTES=str(MAX_BODY),
        IAFACTORY_RUN_WORKER="false",
        IAFACTORY_EMBEDDING_PROVIDER="none",
        IAFACTORY_LOG_LEVEL="INFO",
    )
    exe = Path(sys.executable).with_name("iafactory")
    proc = subprocess.Popen(
        [str(exe), "serve", "--no-migrate", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path_factory.mktemp("serve"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started, log = threading.Event(), []

    def drain() -> None:  # keep reading, so the server never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)
            if "Uvicorn running on" in line:
                started.set()
        started.set()  # the process ended

    threading.Thread(target=drain, daemon=True).start()
    try:
        if not started.wait(120) or proc.poll() is not None:
            pytest.fail("iafactory serve did not start:\n" + "".join(log))
        yield LiveServer("127.0.0.1", port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection or a whole answer is in
    (bounded by the socket's timeout). A reset after the answer counts as a close."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    except ConnectionResetError:
        pass
    return data


def status_of(response: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(match.group(1)) if match else None


def problem(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert re.search(rb"(?im)^content-type: application/problem\+json", head), response[:500]
    return json.loads(body)


def send_all_you_can(sock: socket.socket, data: bytes, chunk: int = 1 << 16) -> None:
    """Send until done or until the server stops listening (it may close before the end)."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), chunk):
            sock.sendall(view[start : start + chunk])
    except (BrokenPipeError, ConnectionResetError):
        pass


def healthy(server: LiveServer) -> bool:
    return httpx.get(f"http://{server.host}:{server.port}/healthz", timeout=WAIT).status_code == 200


# --- headers -----------------------------------------------------------------------------------------


def test_a_50_mb_header_is_refused_without_the_memory_following(live_server: LiveServer) -> None:
    before = live_server.rss_mib()
    with live_server.connect() as sock:
        send_all_you_can(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 50_000_000 + b"\r\n\r\n")
        response = read_response(sock)
    # 431, or the connection closed on the sender (a reset may swallow the answer).
    assert status_of(response) in (431, None), response[:300]
    if response:
        assert "exceed" in problem(response)["detail"]
    assert live_server.rss_mib() - before < 20, "the server buffered the header"
    assert healthy(live_server)


def test_ten_thousand_headers_are_refused(live_server: LiveServer) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    with live_server.connect() as sock:
        send_all_you_can(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        response = read_response(sock)
    assert status_of(response) in (431, None), response[:300]


def test_header_count_limit_holds_on_its_own(live_server: LiveServer) -> None:
    """101 tiny headers: well under the byte limit, over the count limit."""
    too_many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    with live_server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + too_many + b"\r\n")
        response = read_response(sock)
    assert status_of(response) == 431, response[:300]
    assert f"more than {MAX_HEADERS} header fields" in problem(response)["detail"]
    # Control: a normal request with a few dozen headers passes.
    fine = b"".join(b"X-%d: v\r\n" % i for i in range(40))
    with live_server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fine + b"\r\n")
        assert status_of(read_response(sock)) == 200


def test_keep_alive_requests_each_get_a_fresh_header_budget(live_server: LiveServer) -> None:
    """Several requests on one connection, each with headers near the limit: none is refused."""
    padding = b"X-Pad: " + b"p" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    with live_server.connect() as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
            assert status_of(read_response(sock)) == 200


def test_a_client_that_stops_half_way_through_its_headers_is_disconnected(live_server: LiveServer) -> None:
    with live_server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        response = read_response(sock)  # returns when the server closes; the socket timeout bounds it
    assert status_of(response) == 408, response[:300]


def test_a_client_that_sends_nothing_is_disconnected(live_server: LiveServer) -> None:
    with live_server.connect() as sock:
        assert read_response(sock) == b""


def test_a_client_that_trickles_its_headers_is_disconnected_all_the_same(live_server: LiveServer) -> None:
    """Each byte inside the limit, but the whole head not: bytes do not reset the header clock."""
    with live_server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.settimeout(HEADER_TIMEOUT / 4)
        closed = b""
        for _ in range(int(WAIT / (HEADER_TIMEOUT / 4))):
            try:
                sock.sendall(b"X")
                closed = sock.recv(65536)  # the timeout paces the trickle
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the server kept reading a head that never ends")
    assert closed == b"" or status_of(closed) == 408


# --- bodies ------------------------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_gets_413_problem_json(live_server: LiveServer) -> None:
    chunk = b"a" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2 * MAX_BODY // len(chunk))) + b"0\r\n\r\n"
    with live_server.connect() as sock:
        send_all_you_can(
            sock,
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body,
        )
        response = read_response(sock)
    assert status_of(response) == 413, response[:300]
    assert problem(response)["status"] == 413


def test_a_declared_length_over_the_limit_gets_413_before_the_body(live_server: LiveServer) -> None:
    with live_server.connect() as sock:
        sock.sendall(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        response = read_response(sock)
    assert status_of(response) == 413 and problem(response)["status"] == 413


def test_a_body_under_the_limit_still_arrives_chunked(live_server: LiveServer) -> None:
    """Control: the same chunked request, small, reaches the handler (401: wrong password)."""
    payload = json.dumps({"email": "nobody@example.ch", "password": "not-the-password"}).encode()
    with live_server.connect() as sock:
        sock.sendall(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        )
        response = read_response(sock)
    assert status_of(response) == 401, response[:500]


def test_a_body_that_does_not_arrive_gets_408(live_server: LiveServer) -> None:
    with live_server.connect() as sock:
        sock.sendall(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"email":'
        )
        response = read_response(sock)
    assert status_of(response) == 408, response[:300]
    assert problem(response)["status"] == 408


# --- answers -----------------------------------------------------------------------------------------


def test_the_server_does_not_name_itself(live_server: LiveServer) -> None:
    r = httpx.get(f"http://{live_server.host}:{live_server.port}/healthz", timeout=WAIT)
    assert "server" not in r.headers, r.headers
    assert r.headers["x-content-type-options"] == "nosniff"


def test_hsts_only_when_the_request_came_over_https(live_server: LiveServer) -> None:
    """Behind a trusted proxy (127.0.0.1 by default) that says https, browsers are told to stay on
    https; over plain http nothing is pinned."""
    base = f"http://{live_server.host}:{live_server.port}"
    assert "strict-transport-security" not in httpx.get(f"{base}/healthz", timeout=WAIT).headers
    r = httpx.get(f"{base}/healthz", headers={"X-Forwarded-Proto": "https"}, timeout=WAIT)
    assert r.headers["strict-transport-security"].startswith("max-age=31536000")


@pytest.mark.anyio
async def test_security_headers_on_every_kind_of_answer(
    module_api_client: tuple[httpx.AsyncClient, str, object],
) -> None:
    client = module_api_client[0]
    email = f"headers-{os.urandom(4).hex()}@example.ch"
    credentials = {"email": email, "password": "correct-horse-battery"}
    answers = {
        "health": await client.get("/healthz"),
        "401 problem": await client.get("/api/v1/me"),
        "register": await client.post("/api/v1/auth/register", json=credentials),
        "login": await client.post("/api/v1/auth/login", json=credentials),
        "422 problem": await client.post("/api/v1/auth/login", json={"email": "not-an-email"}),
        "openapi": await client.get("/openapi.json"),
        "docs": await client.get("/docs"),
        "redoc": await client.get("/redoc"),
    }
    assert answers["login"].status_code == 200 and "access_token" in answers["login"].json()
    for name, r in answers.items():
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", name
        assert h["x-frame-options"] == "DENY", name
        assert h["referrer-policy"] == "no-referrer", name
        assert "frame-ancestors 'none'" in h["content-security-policy"], name
        assert "strict-transport-security" not in h, name  # plain http
        if name in ("docs", "redoc"):
            # The documentation pages run scripts and styles from this server, nothing from elsewhere.
            csp = h["content-security-policy"]
            assert "script-src 'self' 'unsafe-inline'" in csp and "style-src 'self' 'unsafe-inline'" in csp
            assert "http" not in csp, csp
        else:
            assert h["content-security-policy"].startswith("default-src 'none'"), name
    for name in ("401 problem", "register", "login", "422 problem"):
        assert answers[name].headers["cache-control"] == "no-store", name  # tokens never cached


@pytest.mark.anyio
async def test_hsts_on_https(module_api_client: tuple[httpx.AsyncClient, str, object]) -> None:
    client = module_api_client[0]
    r = await client.get("https://testserver/healthz")
    assert r.headers["strict-transport-security"] == "max-age=31536000"


@pytest.mark.anyio
async def test_an_unexpected_error_gets_the_headers_too(module_db: str) -> None:
    """Starlette answers unhandled exceptions from outside every middleware: the 500 problem
    carries the same headers all the same."""
    settings = fast_settings(module_db)
    async with bootstrap.database(settings, module_db) as db:
        app = create_app(settings, db)

        @app.get("/api/v1/boom", include_in_schema=False)
        async def boom() -> None:
            raise RuntimeError("boom")

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            r = await client.get("/api/v1/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
