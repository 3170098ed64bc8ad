"""Prometheus metrics, served at /metrics.

Labels are bounded on purpose: route *template*, method, status class, plan — never a tenant,
user or key id (per-tenant figures come from the metering tables: usage events, credits).

Several workers: `iafactory serve --workers N` (N > 1) points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start; prometheus_client then keeps each process's values in files
there and a scrape, whichever worker answers it, sums them (counters, histograms; gauges marked
`livesum`). One process: the default in-memory registry.

Other modules record through the small functions below (`count_login_failure`,
`set_admission_queue_length`, `count_shed`, ...) rather than touching the metric objects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("iafactory.metrics")

# prometheus_client chose its value storage when it was imported, from the same variable.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
CONTENT_TYPE = CONTENT_TYPE_LATEST

HTTP_LABELS = ("route", "method", "status", "plan")
REQUESTS = Counter(
    "iafactory_http_requests",
    "HTTP requests answered, by route template, method, status class and tenant plan.",
    HTTP_LABELS,
)
DURATION = Histogram(
    "iafactory_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template, method, status class and tenant plan.",
    HTTP_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LOGIN_FAILURES = Counter("iafactory_login_failures", "Refused sign-ins (POST /auth/login), by reason.", ("reason",))
POOL_SIZE = Gauge(
    "iafactory_db_pool_size", "Open connections of the application pools (all workers).", multiprocess_mode="livesum"
)
POOL_AVAILABLE = Gauge(
    "iafactory_db_pool_available",
    "Idle connections of the application pools (all workers).",
    multiprocess_mode="livesum",
)
POOL_WAITING = Gauge(
    "iafactory_db_pool_requests_waiting",
    "Requests waiting for a pooled connection (all workers).",
    multiprocess_mode="livesum",
)
POOL_MAX = Gauge(
    "iafactory_db_pool_max_size", "Maximum size of the application pools (all workers).", multiprocess_mode="livesum"
)
# Filled by the admission control (load shedding); zero until it reports.
ADMISSION_QUEUE = Gauge(
    "iafactory_admission_queue_length", "Requests waiting for admission (all workers).", multiprocess_mode="livesum"
)
SHED = Counter("iafactory_requests_shed", "Requests refused by admission control (load shedding).")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_PLAN = "none"  # the request acted for no tenant (sign-in, health, metrics)
UNKNOWN_PLAN = "unknown"  # it did, but its plan could not be read in time


# -- what other modules call ----------------------------------------------------------------------
def count_login_failure(reason: str) -> None:
    """`reason`: a fixed word ("bad_credentials", "disabled"), never user input."""
    LOGIN_FAILURES.labels(reason).inc()


def set_admission_queue_length(length: int) -> None:
    """This worker's number of requests waiting for admission (the scrape sums the workers)."""
    ADMISSION_QUEUE.set(length)


def count_shed(n: int = 1) -> None:
    """`n` requests were refused by admission control."""
    SHED.inc(n)


def observe_request(route: str, method: str, status: int, plan: str, seconds: float) -> None:
    labels = (route, method if method in _METHODS else "OTHER", f"{status // 100}xx", plan)
    REQUESTS.labels(*labels).inc()
    DURATION.labels(*labels).observe(seconds)


def update_pool(stats: Mapping[str, int]) -> None:
    """From psycopg_pool's get_stats(): this worker's share of the pool gauges."""
    POOL_SIZE.set(stats.get("pool_size", 0))
    POOL_AVAILABLE.set(stats.get("pool_available", 0))
    POOL_WAITING.set(stats.get("requests_waiting", 0))
    POOL_MAX.set(stats.get("pool_max", 0))


async def refresh_pool_forever(db: Any, every_seconds: float = 5.0) -> None:
    """Keep this worker's pool gauges current, so that a scrape answered by another worker sums
    fresh figures (each worker has its own pool)."""
    while True:
        try:
            update_pool(db.pool_stats())
        except Exception:  # a gauge must never take the worker down
            log.debug("pool stats unavailable", exc_info=True)
        await asyncio.sleep(every_seconds)


def route_template(scope: Mapping[str, Any]) -> str:
    """/api/v1/projects/{item_id}, not the path the client sent (bounded, and no ids)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return "unmatched"
    # Recent FastAPI hands a route of an included router over with its own path, without the
    # router's prefix (/projects/{item_id}); the prefix is the path's leading segments, which the
    # route matched, so they are the router's static text, never a value.
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if ":path}" in template or template == path:
        return template
    segments, own = path.strip("/").split("/"), template.strip("/").split("/")
    if template.strip("/") and len(segments) > len(own):
        return "/" + "/".join(segments[: len(segments) - len(own)]) + template
    return template


# -- the tenant's plan, for the `plan` label ------------------------------------------------------
class PlanLabels:
    """Tenant id -> plan, per process, for a minute. A miss costs one `app.tenant_limits` call,
    made by the middleware *after* the response has been sent (so never on a client's clock);
    the request path itself does not know the plan (the gate does not return it). One lookup per
    tenant at a time: concurrent requests share it, or keep the expired value while it runs."""

    TTL_SECONDS = 60.0
    MAX_ENTRIES = 10_000
    LOOKUP_TIMEOUT_SECONDS = 1.0

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, str]] = {}
        self._inflight: dict[str, asyncio.Future[str]] = {}

    async def plan(self, db: Any, tenant_id: str | UUID | None, *, lookup: bool = True) -> str:
        """`lookup=False`: from the cache only (e.g. after an error escaped the request)."""
        if tenant_id is None:
            return NO_PLAN
        key = str(tenant_id)
        hit = self._cache.get(key)
        if hit is not None and (hit[0] > time.monotonic() or not lookup or db is None):
            return hit[1]
        if not lookup or db is None:
            return UNKNOWN_PLAN
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = asyncio.ensure_future(self._lookup(db, key))
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        elif hit is not None:
            return hit[1]
        return await asyncio.shield(pending)

    async def _lookup(self, db: Any, key: str) -> str:
        try:
            async with asyncio.timeout(self.LOOKUP_TIMEOUT_SECONDS):
                async with db.anonymous(read_only=True) as tx:
                    plan = await tx.fetchval("SELECT plan FROM app.tenant_limits(%s)", (UUID(key),))
        except Exception:  # noqa: BLE001 - a label is not worth failing or slowing anything for
            hit = self._cache.get(key)
            return hit[1] if hit is not None else UNKNOWN_PLAN
        plan = plan or UNKNOWN_PLAN
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + self.TTL_SECONDS, plan)
        return plan


# -- the scrape -----------------------------------------------------------------------------------
class _Snapshot:
    """Figures read at scrape time (from the database), exposed as gauges."""

    def __init__(self, jobs: Mapping[str, Any] | None) -> None:
        self.jobs = jobs

    def collect(self) -> Iterable[Metric]:
        if self.jobs is None:
            return
        yield GaugeMetricFamily(
            "iafactory_knowledge_jobs_pending",
            "Indexing jobs waiting (all tenants), including retries waiting for their backoff.",
            value=self.jobs["pending"],
        )
        yield GaugeMetricFamily(
            "iafactory_knowledge_jobs_runnable",
            "Pending indexing jobs a worker may take now.",
            value=self.jobs["runnable"],
        )
        yield GaugeMetricFamily(
            "iafactory_knowledge_jobs_oldest_pending_age_seconds",
            "Age of the oldest pending indexing job (0 when none).",
            value=self.jobs["oldest_pending_age_seconds"],
        )


async def job_queue_stats(db: Any) -> dict[str, Any] | None:
    """Aggregate queue figures through a definer function: the app role sees no tenant's jobs."""
    try:
        async with asyncio.timeout(2.0):
            async with db.anonymous(read_only=True) as tx:
                return await tx.fetchrow("SELECT * FROM app.knowledge_job_stats()")
    except Exception as err:  # noqa: BLE001 - the rest of the scrape is still worth having
        log.warning("metrics: cannot read the job queue: %s", err)
        return None


def render(jobs: Mapping[str, Any] | None) -> bytes:
    """The exposition text: every worker's metrics (multiprocess) or this process's, plus the
    scrape-time gauges."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(jobs))
    return body + generate_latest(snapshot)


def worker_exiting() -> None:
    """A worker's live gauges leave the sums when it stops (uvicorn does not tell prometheus_client)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
