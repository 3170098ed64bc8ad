"""The FastAPI application: every resource under /api/v1, problem+json errors, one pool, and the
admission control of one worker process (`app.state.load`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline

from iafactory.admission import AdmissionMiddleware, CpuWork, LoadControl
from iafactory.cells.config import DEFAULT_CELL
from iafactory.cells.routing import CellPools
from iafactory.config import Settings, get_settings
from iafactory.db import bootstrap, server
from iafactory.db.scope import Database
from iafactory.http import docs, problems
from iafactory.http.middleware import RequestContextMiddleware
from iafactory.http.security import SecurityHeadersMiddleware
from iafactory.observability import logs, metrics
from iafactory.plans.ratelimit import RedisRateLimiter

log = logging.getLogger("iafactory")


def api_routers() -> list:
    """Every router mounted under /api/v1. The isolation tests enumerate the app's routes, so a
    router added here is covered by them without further work.

    The tenants' records come first: they are nearly all the traffic, and FastAPI tries a
    request's path against the routes one by one (no two routers here share a path, so the order
    changes nothing else). Signing in, members and platform administration follow."""
    from iafactory.audit.endpoints import router as audit_router
    from iafactory.auth.endpoints import router as auth_router
    from iafactory.domains import resource_routers
    from iafactory.tenancy.data_endpoints import router as data_rights_router
    from iafactory.tenancy.endpoints import router as tenancy_router

    return [*resource_routers(), auth_router, tenancy_router, audit_router, data_rights_router]


def create_app(
    settings: Settings | None = None,
    database: Database | None = None,
    *,
    span_exporter: Any = None,
    cells: CellPools | None = None,
) -> FastAPI:
    """`database` (one cell) or `cells` (several, with the directory) lets a caller (tests,
    benchmarks) own the pools; otherwise the lifespan opens them from the settings.
    `span_exporter` turns tracing on with that exporter (tests); otherwise tracing is on when an
    OTLP endpoint is configured."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not logging.getLogger().handlers:
            # Started by uvicorn directly rather than by `iafactory serve`: log in our format anyway.
            logs.configure(settings.log_format, settings.log_level)
        own_db = database is None and cells is None
        if own_db:
            pools = cell_pools(settings)
            await pools.open()
            app.state.cells = pools
            app.state.db = pools.db(pools.home)
        app.state.load.database = app.state.db
        if settings.redis_url:
            app.state.rate_limiter = RedisRateLimiter(settings.redis_url, app.state.db)
        background: list[asyncio.Task[None]] = []
        stop = asyncio.Event()
        run_worker = settings.run_worker if settings.run_worker is not None else settings.database_url is None
        if own_db and run_worker:
            # On the embedded default the API indexes documents and sends emails itself, so one
            # command is enough.
            from iafactory.auth.purge import Retention
            from iafactory.knowledge import worker
            from iafactory.knowledge.embeddings import embedder
            from iafactory.notifications import sender

            model = embedder(settings)
            mail = sender.mailer(settings)
            for db in app.state.cells.dbs.values():  # one indexing worker and one email sender per cell
                background.append(
                    asyncio.create_task(
                        worker.run_forever(
                            db,
                            model,
                            stop,
                            lease_seconds=settings.worker_lease_seconds,
                            retention=Retention.of(settings),
                        )
                    )
                )
                background.append(
                    asyncio.create_task(sender.run_forever(db, mail, stop, lease_seconds=settings.worker_lease_seconds))
                )
        pool_gauges = asyncio.create_task(metrics.refresh_pool_forever(app.state.db))
        try:
            yield
        finally:
            pool_gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_gauges
            if background:
                stop.set()
                for task in background:
                    task.cancel()
                # Each loop hands back (or finishes) what it holds before the pools close: wait for
                # all of them (a plain gather would return as soon as the first one is cancelled).
                await asyncio.gather(*background, return_exceptions=True)
            if app.state.rate_limiter is not None:
                await app.state.rate_limiter.close()
                app.state.rate_limiter = None
            if own_db:
                await app.state.cells.close()
            if app.state.tracing is not None:
                app.state.tracing.shutdown()
            metrics.worker_exiting()
            app.state.load.close()

    # FastAPIOffline serves the Swagger UI and ReDoc files shipped in the fastapi-offline package
    # (under /static-offline-docs), so the interactive docs need no CDN; the pages themselves are
    # iafactory.http.docs (with a policy that keeps them on this origin).
    app = FastAPIOffline(
        docs_url=None,
        redoc_url=None,
        title="IAFactory API",
        version="1.0.0",
        description="Multi-tenant backend for IAFactory's AI products. Every request acts for exactly one "
        "tenant, chosen by its credential; PostgreSQL Row-Level Security enforces it.\n\n"
        "Sign in with `POST /api/v1/auth/login`, then send `Authorization: Bearer <token>` "
        "(or an API key as Bearer or `X-API-Key`). Text and JSON values cannot contain the NUL "
        "character (U+0000): PostgreSQL cannot store it, and such requests get 422.",
        lifespan=lifespan,
        # No call to the public online validator either.
        swagger_ui_parameters={"validatorUrl": None},
        # Every error is application/problem+json (RFC 9457); these can come from any route.
        responses={
            400: {"description": "Malformed request body (application/problem+json)"},
            401: {"description": "Missing or invalid credentials (application/problem+json)"},
            402: {"description": "Out of credits (application/problem+json)"},
            403: {
                "description": "Not allowed: role, key scope, tenant status or plan limit (application/problem+json)"
            },
            404: {"description": "No such record in this tenant (application/problem+json)"},
            409: {"description": "Conflict with the current state (application/problem+json)"},
            408: {"description": "Request body not received in time (application/problem+json)"},
            413: {"description": "Request body too large (application/problem+json)"},
            422: {"description": "Validation failed, naming the field (application/problem+json)"},
            429: {"description": "Rate limit exceeded; see Retry-After (application/problem+json)"},
        },
    )
    app.state.settings = settings
    app.state.key_cache = {}
    app.state.rate_limiter = None
    app.state.load = load_control(settings)
    if cells is not None:
        database = cells.db(cells.home)
    elif database is not None:
        cells = CellPools({DEFAULT_CELL: database})
    if database is not None:
        app.state.cells = cells
        app.state.db = database
        app.state.load.database = database
    app.state.tracing = None
    if span_exporter is not None or settings.otlp_endpoint:
        from iafactory.observability import tracing

        app.state.tracing = tracing.instrument(app, settings, span_exporter)
    problems.install(app)
    docs.install(app)
    app.add_middleware(
        AdmissionMiddleware,
        max_in_flight=settings.max_requests_in_flight,
        load=app.state.load,
        anonymous_paths=frozenset(
            {
                "/api/v1/auth/login",
                "/api/v1/auth/register",
                "/console/sign-in",
                "/console/accept-invitation",
                "/console/verify-email",
                "/console/reset-password",
            }
        ),
        anonymous_max_in_flight=settings.anonymous_max_in_flight,
        credential_max_in_flight=settings.credential_max_in_flight,
    )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        # File uploads: the file's own limit plus room for the multipart envelope and form fields.
        upload_paths=dict.fromkeys(
            ("/api/v1/knowledge-base/files", "/console/knowledge/files"),  # the API's, and the console's form
            max(settings.max_body_bytes, settings.kb_max_file_bytes + 65_536),
        ),
        span_hook=app.state.tracing.annotate if app.state.tracing else None,
        body_timeout=settings.body_timeout_seconds,
    )
    # Added last, so outermost: the 413/408 answers of the middleware above get the headers too.
    app.add_middleware(SecurityHeadersMiddleware, hsts_max_age=settings.hsts_max_age_seconds)
    for router in api_routers():
        app.include_router(router, prefix="/api/v1")
    from iafactory.observability.endpoints import router as metrics_router

    app.include_router(metrics_router)
    from iafactory.console import install as install_console

    install_console(app)

    @app.get("/healthz", tags=["health"], operation_id="check_health", summary="The process is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        operation_id="check_readiness",
        summary="Every database this process needs answers",
        responses={503: {"description": "Which one does not answer (application/problem+json)"}},
    )
    async def readyz(request: Request) -> Any:
        checks = await readiness(request.app)
        failed = {name: reason for name, reason in checks.items() if reason != "ok"}
        if failed:
            name, reason = next(iter(failed.items()))
            return problems.unavailable_response(name, reason, checks=checks)
        return {"status": "ready", "checks": checks}

    return app


def cell_pools(settings: Settings) -> CellPools:
    """The pools of the configured cells and, with several, of the directory (not opened yet)."""
    from iafactory.cells import service as cell_service
    from iafactory.cells.config import cells as configured_cells
    from iafactory.cells.config import directory_cell

    configured = configured_cells(settings)
    if settings.cells is None:
        return CellPools({DEFAULT_CELL: bootstrap.database(settings, server.admin_conninfo(settings))})
    dbs = {
        name: bootstrap.database(cell.settings(settings), cell_service.admin_url(settings, cell))
        for name, cell in configured.items()
    }
    directory = bootstrap.database(settings, cell_service.admin_url(settings, directory_cell()))
    return CellPools(dbs, directory)


def load_control(settings: Settings) -> LoadControl:
    """The CPU-heavy work's own bounded thread pools (the database's gate belongs to its pool)."""
    timeout = settings.queue_timeout_seconds
    hashing = CpuWork(
        "hashing",
        settings.password_hash_concurrency,
        max_waiting=settings.password_hash_max_waiting,
        timeout=timeout,
        nice=settings.cpu_work_nice,
    )
    embedding = CpuWork(
        "embedding",
        settings.embedding_concurrency,
        max_waiting=settings.embedding_max_waiting,
        timeout=timeout,
        key_slots=max(1, settings.embedding_concurrency // 2),
        key_waiting=max(1, settings.embedding_max_waiting // 4),
        nice=settings.cpu_work_nice,
    )
    return LoadControl(hashing, embedding)


async def readiness(app: FastAPI) -> dict[str, str]:
    """ "ok" or why not, for each thing this process cannot serve without: the application's
    database (its pool), and Redis when rate limits are counted there. Within the readyz timeout."""
    settings: Settings = app.state.settings
    checks: dict[str, str] = {}
    pools: CellPools = app.state.cells
    if pools.single:
        checks["database"] = await app.state.db.check(settings.readyz_timeout_seconds) or "ok"
    else:
        assert pools.directory_db is not None
        checks["directory"] = await pools.directory_db.check(settings.readyz_timeout_seconds) or "ok"
        for name, db in pools.dbs.items():
            checks[f"cell {name}"] = await db.check(settings.readyz_timeout_seconds) or "ok"
    if app.state.rate_limiter is not None:
        checks["redis"] = await app.state.rate_limiter.check(settings.readyz_timeout_seconds) or "ok"
    return checks
    return app
