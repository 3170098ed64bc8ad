"""The real `iafactory serve --workers 2` (a subprocess on a free port, a test database): every
request gets one JSON access-log line, from either worker, and /metrics sums both workers.

This is the configuration that used to lose the access log: uvicorn spawns each worker as a new
interpreter, which never saw the logging set up by the CLI process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_support import PASSWORD, fast_settings
from conftest import SECRET_ENV
from iafactory.auth.passwords import hash_password
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
TOKEN = "serve-metrics-token-0123456789"
WAIT = 120.0  # seconds: an upper bound for events, never a delay


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    lines: list[dict[str, Any]] = field(default_factory=list)  # stderr, parsed
    raw: list[str] = field(default_factory=list)  # stderr lines that were not JSON
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read(self, stream: Any) -> None:
        for text in stream:
            with self.changed:
                try:
                    self.lines.append(json.loads(text))
                except ValueError:
                    self.raw.append(text)
                self.changed.notify_all()

    def wait_for(self, what: str, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: predicate(self.lines) or self.proc.poll() is not None, timeout=WAIT)
        assert ok and self.proc.poll() is None, f"server: {what} did not happen; non-JSON output: {self.raw[-20:]}"

    def access(self, request_ids: set[str]) -> list[dict[str, Any]]:
        with self.changed:
            return [
                e for e in self.lines if e.get("logger") == "iafactory.access" and e.get("request_id") in request_ids
            ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(migrated_db: str, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR" and not k.startswith("OTEL_")}
    env.update(
        {
            **SECRET_ENV,
            "DATABASE_URL": migrated_db,
            "IAFACTORY_METRICS_TOKEN": TOKEN,
            "IAFACTORY_LOG_FORMAT": "json",
            "IAFACTORY_LOG_LEVEL": "INFO",
            "IAFACTORY_RUN_WORKER": "false",
            "TMPDIR": str(tmp_path),
        }
    )
    exe = Path(sys.executable).with_name("iafactory")
    proc = subprocess.Popen(
        [str(exe), "serve", "--workers", "2", "--port", str(port), "--no-migrate"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    server = Server(proc, f"http://127.0.0.1:{port}")
    reader = threading.Thread(target=server.read, args=(proc.stderr,), daemon=True)
    reader.start()
    try:
        server.wait_for(
            "two workers started",
            lambda lines: len({e["pid"] for e in lines if e.get("message") == "Application startup complete."}) == 2,
        )
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(timeout=WAIT)


def metric(body: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def seed_tenant(admin_url: str) -> tuple[uuid.UUID, str]:
    """A `pro` tenant with an owner who has a password (the operator path, as api_support does)."""
    tag = uuid.uuid4().hex[:6]
    settings = fast_settings(admin_url)
    async with operator_transaction(admin_url) as tx:
        tenant = await service.create_tenant(
            tx, TenantCreate(name="Observée", slug=f"observed-{tag}", region="CH", plan="pro", status="active")
        )
        email = f"owner-{tag}@example.ch"
        await service.add_member(
            tx, tenant.slug, email, "owner", name="Owner", password_hash=await hash_password(settings, PASSWORD)
        )
    return tenant.id, email


async def test_serve_with_two_workers_logs_every_request_and_sums_metrics(
    served: Server, migrated_db: str, tmp_path: Path
) -> None:
    tenant_id, email = await seed_tenant(migrated_db)
    multiproc = [p for p in tmp_path.iterdir() if p.name.startswith("iafactory-metrics-")]
    assert len(multiproc) == 1  # made by `serve` for its workers

    # No keep-alive: each request opens a connection, which either worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=WAIT) as client:
        r = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        owner = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = await client.post("/api/v1/projects", json={"name": "Suivi"}, headers=owner)
        assert r.status_code == 201, r.text
        project = r.json()["id"]

        async def get(request_id: str, headers: dict[str, str]) -> None:
            resp = await client.get(f"/api/v1/projects/{project}", headers={**headers, "X-Request-Id": request_id})
            assert resp.status_code == 200 and resp.headers["x-request-id"] == request_id

        sent: set[str] = set()
        while len({e["pid"] for e in served.access(sent)}) < 2:
            assert len(sent) < 400, "every request went to the same worker"
            batch = {f"get-{len(sent) + i}" for i in range(20)}
            await asyncio.gather(*(get(rid, owner) for rid in batch))
            sent |= batch
            served.wait_for("an access line per request", lambda _, sent=sent: len(served.access(sent)) == len(sent))

        lines = served.access(sent)
        assert len(lines) == len(sent) and {e["request_id"] for e in lines} == sent  # one line each
        for line in lines:
            assert line["tenant_id"] == str(tenant_id) and isinstance(line["user_id"], int)
            assert (line["route"], line["method"], line["status"], line["plan"]) == (
                "/api/v1/projects/{item_id}",
                "GET",
                200,
                "pro",
            )
            assert line["duration_ms"] >= 0 and line["client_ip"] == "127.0.0.1" and line["level"] == "info"

        r = await client.post("/api/v1/api-keys", json={"name": "reader", "scope": "read"}, headers=owner)
        assert r.status_code == 201, r.text
        await get("by-key", {"X-API-Key": r.json()["key"]})
        served.wait_for("the API key's access line", lambda _: len(served.access({"by-key"})) == 1)
        [by_key] = served.access({"by-key"})
        assert by_key["api_key_id"] == r.json()["id"] and "user_id" not in by_key

        for _ in range(3):
            r = await client.post("/api/v1/auth/login", json={"email": email, "password": "not-the-password"})
            assert r.status_code == 401
        for i in range(2):
            r = await client.post(
                "/api/v1/knowledge-base", json={"title": f"doc {i}", "content": "texte"}, headers=owner
            )
            assert r.status_code == 201, r.text

        assert (await client.get("/metrics")).status_code == 401
        r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        body = r.text

    # Both workers' counts, whichever worker answered the scrape.
    labels = {"route": "/api/v1/projects/{item_id}", "method": "GET", "status": "2xx", "plan": "pro"}
    assert metric(body, "iafactory_http_requests_total", **labels) == len(sent) + 1
    assert metric(body, "iafactory_http_request_duration_seconds_count", **labels) == len(sent) + 1
    assert metric(body, "iafactory_login_failures_total", reason="bad_credentials") == 3
    assert metric(body, "iafactory_knowledge_jobs_pending") == 2
    assert metric(body, "iafactory_db_pool_max_size") == 2 * fast_settings(migrated_db).pool_max_size
    assert str(tenant_id) not in body

    # Every line of the service is JSON (uvicorn's own included), naming its worker.
    assert not served.raw, served.raw[:5]
    assert {e["logger"] for e in served.lines} >= {"uvicorn.error", "iafactory.access"}
    pids = {e["pid"] for e in served.lines}
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=WAIT) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("iafactory-metrics-")]  # cleaned up
    assert len(pids) >= 3  # the supervisor and two workers
