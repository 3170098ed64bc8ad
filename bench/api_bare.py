"""The bare baseline for bench/api.py: the projects endpoints with nothing of ours around them.

    python bench/api_bare.py --host 127.0.0.1 --port P [--workers W]
    (database: BENCH_BARE_DATABASE_URL, else DATABASE_URL; pool sizes: IAFACTORY_POOL_MIN_SIZE / _MAX_SIZE;
     BENCH_BARE_PREPARE=0: no prepared statements, e.g. behind PgBouncer 1.18 in transaction mode)

Same framework (FastAPI on uvicorn, started with the same options as `iafactory serve`), same
driver (a psycopg async pool, autocommit, dict rows, psycopg's own automatic prepared statements),
same request and response models (ProjectCreate, ProjectOut, Page) and the same SQL as
iafactory.resources.repository, but:

* no authentication: the tenant is whatever the `X-Tenant-Id` header says;
* no tenant scope, no gate, no RLS: the pool logs in as the administrative role, each statement
  runs on its own in autocommit with an explicit `WHERE tenant_id = $1`;
* no middleware, no problem+json handlers.

It answers what the product's request path costs on top of "FastAPI + psycopg + the query". It is
a benchmark fixture: it trusts a header for the tenant and must never be exposed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import uvicorn
from fastapi import FastAPI, Header, Query
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from iafactory.config import Settings
from iafactory.projects.schemas import ProjectCreate, ProjectOut
from iafactory.resources.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page, page_of
from iafactory.serve import uvicorn_options

# The statements iafactory.resources.repository builds for PROJECTS, written out.
_COLUMNS = ", ".join(f'"{c}"' for c in ProjectOut.model_fields)
LIST = f'SELECT {_COLUMNS} FROM "projects" WHERE tenant_id = %s ORDER BY created_at DESC, id DESC LIMIT %s'
GET = f'SELECT {_COLUMNS} FROM "projects" WHERE tenant_id = %s AND id = %s'
INSERT = (
    f'INSERT INTO "projects" ("tenant_id", "name", "description", "status", "settings") '
    f"VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}"
)

TenantId = Annotated[UUID, Header(alias="x-tenant-id")]


def database_url() -> str:
    url = os.environ.get("BENCH_BARE_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("api_bare: set BENCH_BARE_DATABASE_URL or DATABASE_URL")
    return url


def create_app() -> FastAPI:
    settings = Settings()
    # psycopg prepares a statement on its 5th run (its default), unless told not to (a transaction
    # pooler that tracks no prepared statements would hand the next run another server session).
    prepare = {} if os.environ.get("BENCH_BARE_PREPARE", "1") != "0" else {"prepare_threshold": None}
    pool = AsyncConnectionPool(
        database_url(),
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs={"autocommit": True, "row_factory": dict_row, **prepare},
        open=False,
        name="bench-bare",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=True)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="bare baseline (benchmark only)", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        return {"status": "ok"}

    @app.post("/api/v1/projects", status_code=201, response_model=ProjectOut)
    async def create(body: ProjectCreate, tenant_id: TenantId) -> Any:
        data = body.model_dump()
        async with pool.connection() as conn:
            cur = await conn.execute(
                INSERT, (tenant_id, data["name"], data["description"], data["status"], Jsonb(data["settings"]))
            )
            return await cur.fetchone()

    @app.get("/api/v1/projects", response_model=Page[ProjectOut])
    async def list_(tenant_id: TenantId, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT) -> Any:
        async with pool.connection() as conn:
            rows = await (await conn.execute(LIST, (tenant_id, limit + 1))).fetchall()
        items, next_cursor = page_of(rows, limit)
        return {"items": items, "next_cursor": next_cursor}

    @app.get("/api/v1/projects/{item_id}", response_model=ProjectOut)
    async def get(item_id: int, tenant_id: TenantId) -> Any:
        async with pool.connection() as conn:
            row = await (await conn.execute(GET, (tenant_id, item_id))).fetchone()
        if row is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return row

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    database_url()  # fail before uvicorn starts
    # The options iafactory.serve.run_server passes (protocol with its limits, no server header...),
    # so only the application differs.
    uvicorn.run(
        "api_bare:create_app",
        factory=True,
        app_dir=str(Path(__file__).parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        **uvicorn_options(Settings()),
    )


if __name__ == "__main__":
    main()
