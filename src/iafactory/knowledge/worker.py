"""The indexing worker: a job queue in PostgreSQL (`FOR UPDATE SKIP LOCKED`), retried with
backoff, safe to run several at once. `iafactory worker` runs one; `iafactory serve` runs one
in-process on the embedded default so that the first README command just works.

A claimed job is held by a short lease (`IAFACTORY_WORKER_LEASE_SECONDS`) that a heartbeat renews
while the job runs. A worker that is stopped (SIGTERM, or the server shutting down) gives its job
back at once, without counting the attempt; a worker that dies loses its job when the lease runs
out, and another worker takes it.

When idle, the worker also deletes expired idempotency keys (every few minutes, in batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any
from uuid import UUID

from iafactory.auth.purge import Retention, purge_account_records
from iafactory.db.scope import Database
from iafactory.knowledge.embeddings import Embedder
from iafactory.knowledge.indexing import index_document
from iafactory.knowledge.schemas import JOBS_CHANNEL
from iafactory.observability import logs
from iafactory.tenancy.context import TenantContext

log = logging.getLogger("iafactory.worker")
MAX_ATTEMPTS = 5
IDLE_POLL_SECONDS = 2.0
LEASE_SECONDS = 25
PURGE_EVERY_SECONDS = 300.0
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

_HELD = "tenant_id = %s AND id = %s AND lease_token = %s AND status = 'running'"


def _key(job: dict[str, Any]) -> tuple[UUID, int, UUID]:
    return job["tenant_id"], job["id"], job["lease_token"]


async def _finish(db: Database, job: dict[str, Any], error: str | None) -> None:
    """Record the outcome, if this worker still holds the job (its lease did not run out)."""
    tenant_id, job_id, token = _key(job)
    document_id, attempts = job["document_id"], job["attempts"]
    async with db.tenant(TenantContext(tenant_id=tenant_id)) as tx:
        if error is None:
            await tx.execute(
                f"UPDATE knowledge_jobs SET status = 'done', last_error = NULL, lease_until = NULL WHERE {_HELD}",
                (tenant_id, job_id, token),
            )
            return
        if attempts >= MAX_ATTEMPTS:
            held = await tx.execute(
                f"UPDATE knowledge_jobs SET status = 'failed', last_error = %s, lease_until = NULL WHERE {_HELD}",
                (error[:2000], tenant_id, job_id, token),
            )
            if held:
                await tx.execute(
                    "UPDATE knowledge_base SET index_status = 'failed', index_error = %s "
                    "WHERE tenant_id = %s AND id = %s",
                    (error[:2000], tenant_id, document_id),
                )
            return
        # Exponential backoff: 2, 4, 8, 16 s.
        held = await tx.execute(
            f"""UPDATE knowledge_jobs SET status = 'queued', last_error = %s, lease_until = NULL,
                       run_after = now() + make_interval(secs => power(2, attempts))
                WHERE {_HELD}""",
            (error[:2000], tenant_id, job_id, token),
        )
        if held:
            # Nothing is indexing it until the retry: the document waits, as a new one does.
            await tx.execute(
                "UPDATE knowledge_base SET index_status = 'pending' "
                "WHERE tenant_id = %s AND id = %s AND index_status = 'indexing'",
                (tenant_id, document_id),
            )


async def _release(db: Database, job: dict[str, Any]) -> None:
    """Give a job back unfinished (the worker is stopping): queued again at once, and the attempt
    does not count; other workers are woken."""
    tenant_id, job_id, token = _key(job)
    async with db.tenant(TenantContext(tenant_id=tenant_id)) as tx:
        held = await tx.execute(
            f"""UPDATE knowledge_jobs SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = now(),
                       lease_until = NULL, lease_token = NULL, worker = NULL
                WHERE {_HELD}""",
            (tenant_id, job_id, token),
        )
        if held:
            await tx.execute(
                "UPDATE knowledge_base SET index_status = 'pending' "
                "WHERE tenant_id = %s AND id = %s AND index_status = 'indexing'",
                (tenant_id, job["document_id"]),
            )
            await tx.execute("SELECT pg_notify(%s, '')", (JOBS_CHANNEL,))
    log.info("released job %s (document %s) tenant=%s", job_id, job["document_id"], tenant_id)


async def _heartbeat(db: Database, job: dict[str, Any], lease_seconds: int) -> None:
    """Renew the lease every third of it while the job runs; stop when it has been lost."""
    tenant_id, job_id, token = _key(job)
    while True:
        await asyncio.sleep(lease_seconds / 3)
        try:
            async with db.tenant(TenantContext(tenant_id=tenant_id)) as tx:
                held = await tx.execute(
                    f"UPDATE knowledge_jobs SET lease_until = now() + make_interval(secs => %s) WHERE {_HELD}",
                    (lease_seconds, tenant_id, job_id, token),
                    last=True,
                )
        except Exception:  # the database may be restarting: try again next beat
            log.warning("could not renew the lease of job %s", job_id, exc_info=True)
            continue
        if not held:
            log.warning(
                "lost the lease of job %s (document %s): another worker may take it", job_id, job["document_id"]
            )
            return


async def run_one(
    db: Database, embedder: Embedder, *, lease_seconds: int = LEASE_SECONDS, worker_id: str = WORKER_ID
) -> bool:
    """Claim and do one job. False when the queue has nothing runnable. Cancelled (the worker is
    stopping), it gives the job back before letting the cancellation through."""
    async with db.anonymous() as tx:
        job = await tx.fetchrow("SELECT * FROM app.claim_knowledge_job(%s, %s)", (lease_seconds, worker_id))
    if job is None:
        return False
    # Lines logged while the job runs carry its tenant and id (JSON fields, like a request's).
    with logs.bind(tenant_id=str(job["tenant_id"]), job_id=job["id"]):
        if job["attempts"] > MAX_ATTEMPTS:
            # Claimed again and again after the lease ran out: the job kills its workers.
            await _finish(
                db,
                {**job, "attempts": MAX_ATTEMPTS},
                f"the worker indexing this document stopped without finishing {MAX_ATTEMPTS} times",
            )
            return True
        started = time.perf_counter()
        error = None
        heartbeat = asyncio.create_task(_heartbeat(db, job, lease_seconds))
        try:
            result = await index_document(
                db, embedder, job["tenant_id"], job["document_id"], force_reembed=job["kind"] == "reembed"
            )
            log.info(
                "indexed document %s: %s chunks (%s embedded) in %.0f ms",
                job["document_id"],
                result.chunks,
                result.embedded,
                (time.perf_counter() - started) * 1000,
            )
        except asyncio.CancelledError:
            heartbeat.cancel()
            await asyncio.shield(_release(db, job))
            raise
        except Exception as err:  # noqa: BLE001 - any failure is retried, then recorded
            error = f"{type(err).__name__}: {err}"
            log.warning("indexing document %s failed (attempt %s): %s", job["document_id"], job["attempts"], error)
        finally:
            heartbeat.cancel()
        await asyncio.shield(_finish(db, job, error))
    return True


async def drain(db: Database, embedder: Embedder, **kwargs: Any) -> int:
    """Run jobs until none is runnable; returns how many ran (used by tests and `worker --once`)."""
    done = 0
    while await run_one(db, embedder, **kwargs):
        done += 1
    return done


async def purge_idempotency_keys(db: Database) -> int:
    """Delete expired idempotency keys of every tenant, a batch at a time (013)."""
    deleted = 0
    while True:
        async with db.anonymous() as tx:
            batch = await tx.fetchval("SELECT app.purge_idempotency_keys(1000)")
        deleted += batch
        if batch < 1000:
            return deleted


async def maintain(db: Database, retention: Retention) -> None:
    """The periodic housekeeping of a cell: expired idempotency keys, and spent account records
    (sessions, tokens, security events) past their retention. Each part tries again next time."""
    try:
        if deleted := await purge_idempotency_keys(db):
            log.info("deleted %s expired idempotency keys", deleted)
    except Exception:
        log.warning("could not delete expired idempotency keys", exc_info=True)
    try:
        if deleted_by_kind := {k: n for k, n in (await purge_account_records(db, retention)).items() if n}:
            log.info("purged account records past their retention: %s", deleted_by_kind)
    except Exception:
        log.warning("could not purge old account records", exc_info=True)


async def run_forever(
    db: Database,
    embedder: Embedder,
    stop: asyncio.Event | None = None,
    *,
    lease_seconds: int = LEASE_SECONDS,
    retention: Retention | None = None,
) -> None:
    """Work while there is work; otherwise wait for a NOTIFY from a new job, or a short poll.
    Setting `stop`, or cancelling this task, interrupts the job in hand and gives it back.
    Every PURGE_EVERY_SECONDS when idle: `maintain` (with `retention`, default: the settings' defaults)."""
    retention = retention or Retention()
    stop = stop or asyncio.Event()
    wake = asyncio.Event()
    listener = asyncio.create_task(db.listen(JOBS_CHANNEL, wake, stop))
    stopping = asyncio.create_task(stop.wait())
    job: asyncio.Task[bool] | None = None
    next_purge = time.monotonic()
    try:
        while not stop.is_set():
            job = asyncio.create_task(run_one(db, embedder, lease_seconds=lease_seconds))
            await asyncio.wait({job, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                break  # stopping: the finally clause interrupts the job
            try:
                if job.result():
                    continue
            except Exception:  # the database may be restarting: keep the worker alive
                log.exception("worker loop error")
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_EVERY_SECONDS
                await maintain(db, retention)
            wake.clear()
            woken = asyncio.create_task(wake.wait())
            await asyncio.wait({woken, stopping}, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
    finally:
        if job is not None and not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        stopping.cancel()
        listener.cancel()
