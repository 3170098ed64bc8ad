"""Indexing jobs are never stuck: a stopped worker gives its job back, a dead one loses it.

The defect: a worker killed while indexing, or a graceful stop of `serve` (SIGTERM), left the
document `indexing` and its job `running` until a five-minute lease expired.

The worker here is the installed `iafactory worker` (or `iafactory serve` with its in-process
worker), a real process on a real database. Its embedding model is an OpenAI-compatible HTTP
endpoint run by the test, which holds its answer back: the worker is then in the middle of a
job for as long as the test wants, and the test knows when it got there. Nothing is mocked.
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
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import SECRET_ENV, settings_for
from iafactory.db import bootstrap
from iafactory.knowledge import worker
from iafactory.knowledge.embeddings import OpenAICompatibleEmbedder

EXE = str(Path(sys.executable).with_name("iafactory"))
WAIT = 120  # seconds: a bound on every wait below, never a synchronisation
LEASE = 6  # a short lease, renewed every 2 s


class EmbeddingService:
    """An OpenAI-compatible /embeddings endpoint that answers only once `release` is set."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                texts = json.loads(self.rfile.read(int(self.headers["content-length"])))["input"]
                service.arrived.set()
                service.release.wait(WAIT)
                body = json.dumps(
                    {"data": [{"index": i, "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(len(texts))]}
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the worker hung up (it was stopped)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def service() -> Iterator[EmbeddingService]:
    s = EmbeddingService()
    yield s
    s.close()


def admin(url: str, query: str, params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def new_document(url: str) -> tuple[uuid.UUID, int]:
    """A tenant and one document in it; the document's insert queues its indexing job."""
    slug = f"lease-{uuid.uuid4().hex[:8]}"
    [tenant] = admin(
        url,
        "INSERT INTO tenants (name, slug, region, plan, status) VALUES (%s, %s, 'CH', 'pro', 'active') RETURNING id",
        (slug, slug),
    )
    [doc] = admin(
        url,
        "INSERT INTO knowledge_base (tenant_id, title, content) VALUES (%s, %s, %s) RETURNING id",
        (tenant["id"], "Règlement de la bibliothèque", "Les livres sont prêtés pour trois semaines."),
    )
    return tenant["id"], doc["id"]


def state(url: str, document_id: int) -> dict[str, Any]:
    [row] = admin(
        url,
        """SELECT j.status, j.attempts, j.lease_until, j.lease_token, j.locked_at, j.worker,
                                 j.lease_until > now() AS leased, now() - j.locked_at AS held_for,
                                 d.index_status
                          FROM knowledge_jobs j JOIN knowledge_base d ON d.tenant_id = j.tenant_id AND d.id = j.document_id
                          WHERE j.document_id = %s""",
        (document_id,),
    )
    return row


def env_for(url: str, service: EmbeddingService, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_")}
    env.update(SECRET_ENV)
    env.update(
        DATABASE_URL=url,
        IAFACTORY_EMBEDDING_PROVIDER="openai",
        IAFACTORY_EMBEDDING_URL=service.url,
        IAFACTORY_EMBEDDING_MODEL="held-back",
        IAFACTORY_WORKER_LEASE_SECONDS=str(LEASE),
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, url: str, service: EmbeddingService) -> subprocess.Popen[str]:
    if kind == "worker":
        args, env = ["worker"], env_for(url, service)
    else:  # the API with its in-process worker, stopped the way a process manager stops it
        args = ["serve", "--no-migrate", "--port", str(free_port())]
        env = env_for(url, service, IAFACTORY_RUN_WORKER="true")
    return subprocess.Popen([EXE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_embedding(proc: subprocess.Popen[str], service: EmbeddingService) -> None:
    if not service.arrived.wait(WAIT):
        proc.kill()
        pytest.fail(f"the worker never asked for embeddings: {proc.communicate()[0]}")


async def index_with(url: str, service: EmbeddingService) -> int:
    """Run the queue once in this process, with the embedding service answering."""
    service.release.set()
    db = bootstrap.database(settings_for(url), url)
    async with db:
        return await worker.drain(db, OpenAICompatibleEmbedder(service.url, "held-back", None, 4), lease_seconds=LEASE)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["worker", "serve"])
async def test_sigterm_during_indexing_gives_the_job_back(
    migrated_db: str, service: EmbeddingService, kind: str
) -> None:
    _, doc = new_document(migrated_db)
    proc = start(kind, migrated_db, service)
    try:
        wait_until_embedding(proc, service)
        held = state(migrated_db, doc)
        assert (held["status"], held["attempts"], held["index_status"]) == ("running", 1, "indexing")
        assert held["leased"] and held["worker"]
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=WAIT)[0]
        # uvicorn re-raises the signal once it has shut down gracefully.
        assert proc.returncode in ((0,) if kind == "worker" else (0, -signal.SIGTERM)), output
        assert "released job" in output
    finally:
        if proc.poll() is None:
            proc.kill()
    # Back in the queue at once, the interrupted attempt not counted, the document pending again.
    released = state(migrated_db, doc)
    assert (released["status"], released["attempts"], released["index_status"]) == ("queued", 0, "pending"), released
    assert released["lease_until"] is None and released["lease_token"] is None
    assert admin(migrated_db, "SELECT count(*) AS n FROM knowledge_jobs WHERE status = 'running'") == [{"n": 0}]
    # The next worker takes it straight away and finishes it.
    assert await index_with(migrated_db, service) == 1
    done = state(migrated_db, doc)
    assert (done["status"], done["attempts"], done["index_status"]) == ("done", 1, "indexed")


@pytest.mark.anyio
async def test_a_running_job_keeps_its_lease_and_a_killed_workers_job_is_taken_after_it(
    migrated_db: str, service: EmbeddingService
) -> None:
    _, doc = new_document(migrated_db)
    proc = start("worker", migrated_db, service)
    try:
        wait_until_embedding(proc, service)
        first = state(migrated_db, doc)
        # The heartbeat keeps the job beyond its first lease while the worker lives...
        deadline = time.monotonic() + WAIT
        while state(migrated_db, doc)["held_for"].total_seconds() <= LEASE + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        renewed = state(migrated_db, doc)
        assert renewed["held_for"].total_seconds() > LEASE + 1
        assert renewed["status"] == "running" and renewed["leased"], renewed
        assert renewed["lease_token"] == first["lease_token"] and renewed["lease_until"] > first["lease_until"]
        # ... so no other worker can take it.
        db = bootstrap.database(settings_for(migrated_db), migrated_db)
        async with db, db.anonymous() as tx:
            assert await tx.fetchrow("SELECT * FROM app.claim_knowledge_job(%s, 'other')", (LEASE,)) is None
        proc.kill()  # SIGKILL: no chance to give anything back
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state(migrated_db, doc)["status"] == "running"
    # Once the lease has run out, another worker takes the job and indexes the document.
    deadline = time.monotonic() + WAIT
    ran = 0
    while not ran and time.monotonic() < deadline:
        ran = await index_with(migrated_db, service)
        if not ran:
            await asyncio.sleep(0.2)
    assert ran == 1
    done = state(migrated_db, doc)
    assert (done["status"], done["attempts"], done["index_status"]) == ("done", 2, "indexed")
