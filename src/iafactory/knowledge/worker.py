"""The indexing worker: a job queue in PostgreSQL (`FOR UPDATE SKIP LOCKED`), retried with
backoff, safe to run several at once. `iafactory worker` runs one; `iafactory serve` runs one
in-process on the embedded default so that the first README command just works."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

from iafactory.db.scope import Database
from iafactory.knowledge.embeddings import Embedder
from iafactory.knowledge.indexing import index_document
from iafactory.observability import logs
from iafactory.tenancy.context import TenantContext

log = logging.getLogger("iafactory.worker")
MAX_ATTEMPTS = 5
IDLE_POLL_SECONDS = 2.0


async def _finish(db: Database, tenant_id: UUID, job_id: int, document_id: int, error: str | None,
                  attempts: int) -> None:
    async with db.tenant(TenantContext(tenant_id=tenant_id)) as tx:
        if error is None:
            await tx.execute("UPDATE knowledge_jobs SET status = 'done', last_error = NULL "
                             "WHERE tenant_id = %s AND id = %s", (tenant_id, job_id))
        elif attempts >= MAX_ATTEMPTS:
            await tx.execute("UPDATE knowledge_jobs SET status = 'failed', last_error = %s "
                             "WHERE tenant_id = %s AND id = %s", (error[:2000], tenant_id, job_id))
            await tx.execute("UPDATE knowledge_base SET index_status = 'failed', index_error = %s "
                             "WHERE tenant_id = %s AND id = %s", (error[:2000], tenant_id, document_id))
        else:
            # Exponential backoff: 2, 4, 8, 16 s.
            await tx.execute(
                """UPDATE knowledge_jobs SET status = 'queued', last_error = %s,
                          run_after = now() + make_interval(secs => power(2, attempts))
                   WHERE tenant_id = %s AND id = %s""", (error[:2000], tenant_id, job_id))
            # Nothing is indexing it until the retry: the document waits, as a new one does.
            await tx.execute("UPDATE knowledge_base SET index_status = 'pending' "
                             "WHERE tenant_id = %s AND id = %s AND index_status = 'indexing'",
                             (tenant_id, document_id))


async def run_one(db: Database, embedder: Embedder) -> bool:
    """Claim and do one job. False when the queue has nothing runnable."""
    async with db.anonymous() as tx:
        job = await tx.fetchrow("SELECT * FROM app.claim_knowledge_job()")
    if job is None:
        return False
    # Lines logged while the job runs carry its tenant and id (JSON fields, like a request's).
    with logs.bind(tenant_id=str(job["tenant_id"]), job_id=job["id"]):
        started = time.perf_counter()
        error = None
        try:
            result = await index_document(db, embedder, job["tenant_id"], job["document_id"],
                                          force_reembed=job["kind"] == "reembed")
            log.info("indexed document %s: %s chunks (%s embedded) in %.0f ms", job["document_id"], result.chunks,
                     result.embedded, (time.perf_counter() - started) * 1000)
        except Exception as err:  # noqa: BLE001 - any failure is retried, then recorded
            error = f"{type(err).__name__}: {err}"
            log.warning("indexing document %s failed (attempt %s): %s", job["document_id"], job["attempts"], error)
        await _finish(db, job["tenant_id"], job["id"], job["document_id"], error, job["attempts"])
    return True


async def drain(db: Database, embedder: Embedder) -> int:
    """Run jobs until none is runnable; returns how many ran (used by tests and `worker --once`)."""
    done = 0
    while await run_one(db, embedder):
        done += 1
    return done


async def run_forever(db: Database, embedder: Embedder, stop: asyncio.Event | None = None) -> None:
    """Work while there is work; otherwise wait for a NOTIFY from a new job, or a short poll."""
    stop = stop or asyncio.Event()
    wake = asyncio.Event()
    listener = asyncio.create_task(db.listen("iafactory_knowledge_jobs", wake, stop))
    try:
        while not stop.is_set():
            try:
                if await run_one(db, embedder):
                    continue
            except Exception:  # noqa: BLE001 - the database may be restarting: keep the worker alive
                log.exception("worker loop error")
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass
    finally:
        listener.cancel()
