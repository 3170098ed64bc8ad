"""`iafactory serve`: the HTTP service (uvicorn)."""

from __future__ import annotations

import asyncio

import typer
import uvicorn

from iafactory.cli import admin_url, app, console
from iafactory.config import get_settings
from iafactory.db.bootstrap import migrate_and_prepare


def run_server(host: str, port: int, workers: int) -> None:
    uvicorn.run("iafactory.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=get_settings().log_level.lower(), access_log=False, proxy_headers=True)


@app.command("serve")
def serve_command(
    host: str = typer.Option(None, help="Interface to listen on (default IAFACTORY_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default IAFACTORY_PORT or 8000)."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes."),
    migrate: bool = typer.Option(True, "--migrate/--no-migrate", help="Apply pending migrations first."),
) -> None:
    """Run the API (OpenAPI at /openapi.json, docs at /docs)."""
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    if migrate:
        applied = asyncio.run(migrate_and_prepare(admin_url(), settings))
        if applied:
            console.print(f"applied {len(applied)} migration(s)")
    console.print(f"IAFactory API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    run_server(host, port, workers)
