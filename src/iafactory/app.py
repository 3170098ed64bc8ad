"""The FastAPI application: every resource under /api/v1, problem+json errors, one pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from iafactory.config import Settings, get_settings
from iafactory.db import bootstrap, server
from iafactory.db.scope import Database
from iafactory.http import problems
from iafactory.http.middleware import RequestContextMiddleware
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
    from iafactory.tenancy.endpoints import router as tenancy_router

    return [*resource_routers(), auth_router, tenancy_router, audit_router]


def create_app(settings: Settings | None = None, database: Database | None = None) -> FastAPI:
    """`database` lets a caller (tests, benchmarks) own the pool; otherwise the lifespan opens one."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_db = database is None
        if own_db:
            db = bootstrap.database(settings, server.admin_conninfo(settings))
            await db.open()
            app.state.db = db
        if settings.redis_url:
            app.state.rate_limiter = RedisRateLimiter(settings.redis_url, app.state.db)
        worker_task, stop = None, asyncio.Event()
        run_worker = settings.run_worker if settings.run_worker is not None else settings.database_url is None
        if own_db and run_worker:
            # On the embedded default the API indexes documents itself, so one command is enough.
            from iafactory.knowledge import worker
            from iafactory.knowledge.embeddings import embedder

            worker_task = asyncio.create_task(worker.run_forever(app.state.db, embedder(settings), stop))
        try:
            yield
        finally:
            if worker_task is not None:
                stop.set()
                worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker_task
            if app.state.rate_limiter is not None:
                await app.state.rate_limiter.close()
                app.state.rate_limiter = None
            if own_db:
                await app.state.db.close()

    app = FastAPI(
        title="IAFactory API",
        version="1.0.0",
        description="Multi-tenant backend for IAFactory's AI products. Every request acts for exactly one "
                    "tenant, chosen by its credential; PostgreSQL Row-Level Security enforces it.",
        lifespan=lifespan,
        # Every error is application/problem+json (RFC 9457); these can come from any route.
        responses={
            400: {"description": "Malformed request body (application/problem+json)"},
            401: {"description": "Missing or invalid credentials (application/problem+json)"},
            402: {"description": "Out of credits (application/problem+json)"},
            403: {"description": "Not allowed: role, key scope, tenant status or plan limit (application/problem+json)"},
            404: {"description": "No such record in this tenant (application/problem+json)"},
            409: {"description": "Conflict with the current state (application/problem+json)"},
            413: {"description": "Request body too large (application/problem+json)"},
            422: {"description": "Validation failed, naming the field (application/problem+json)"},
            429: {"description": "Rate limit exceeded; see Retry-After (application/problem+json)"},
        },
    )
    app.state.settings = settings
    app.state.key_cache = {}
    app.state.rate_limiter = None
    if database is not None:
        app.state.db = database
    problems.install(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    for router in api_routers():
        app.include_router(router, prefix="/api/v1")

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database answers")
    async def readyz(request: Request) -> Any:
        try:
            async with request.app.state.db.anonymous(read_only=True) as tx:
                await tx.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return problems.problem_response(503, "Service Unavailable", "the database is not reachable")
        return {"status": "ready"}

    return app
