"""`iafactory serve`: the HTTP service (uvicorn, with the limits of iafactory/http/protocol.py)."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
from typing import Any

import typer
import uvicorn

from iafactory.cells.config import serving_problem
from iafactory.cli import app, console, print_error
from iafactory.config import SECRET_HINT, ConfigError, Settings, get_settings, serving_problems
from iafactory.db.bootstrap import migrate_everywhere
from iafactory.http.protocol import HttpLimits, LimitedHttpToolsProtocol
from iafactory.observability import logs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Server options shared by `serve` and the benchmarks' baseline server."""
    limits = HttpLimits(settings.max_header_bytes, settings.max_headers, settings.header_timeout_seconds)
    return {
        "http": functools.partial(LimitedHttpToolsProtocol, limits=limits),
        "timeout_keep_alive": settings.keep_alive_timeout_seconds,
        "server_header": False,  # no "server: uvicorn": nothing to look up in a vulnerability list
        "date_header": True,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "proxy_headers": True,
    }


def run_server(host: str, port: int, workers: int, log_format: str | None = None) -> None:
    """Logging is handed to uvicorn as `log_config`, which it applies in this process and again in
    each worker process it spawns. With several workers the metrics live in files of a fresh
    directory (prometheus_client's multiprocess mode), set before the workers start and removed
    after they stop; an operator's own PROMETHEUS_MULTIPROC_DIR is used as is and kept."""
    settings = get_settings()
    log_config = logs.logging_config(log_format or settings.log_format, settings.log_level)
    own_dir = None
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="iafactory-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    try:
        uvicorn.run(
            "iafactory.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=log_config,
            **uvicorn_options(settings),
        )
    finally:
        if own_dir is not None:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(own_dir, ignore_errors=True)


def settings_to_serve(host: str | None) -> tuple[Settings, str]:
    """The settings, and the host to listen on, once it is safe to serve; otherwise one `error:`
    line naming every missing or unusable setting, and exit status 1, before anything starts."""
    try:
        settings = get_settings()
    except ConfigError as err:
        print_error(str(err))
        raise typer.Exit(1) from err
    host = host or settings.host
    if problem := serving_problem(settings):
        print_error(problem)
        raise typer.Exit(1)
    problems = serving_problems(settings, host)
    if problems:
        print_error(f"{'; '.join(problems)} ({SECRET_HINT})")
        raise typer.Exit(1)
    return settings, host


@app.command("serve")
def serve_command(
    host: str = typer.Option(None, help="Interface to listen on (default IAFACTORY_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default IAFACTORY_PORT or 8000)."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes."),
    migrate: bool = typer.Option(True, "--migrate/--no-migrate", help="Apply pending migrations first."),
) -> None:
    """Run the API (OpenAPI at /openapi.json, docs at /docs, metrics at /metrics)."""
    settings, host = settings_to_serve(host)
    port = port or settings.port
    if migrate:
        applied = asyncio.run(migrate_everywhere(settings))
        if applied:
            console.print(f"applied {len(applied)} migration(s)")
    console.print(f"IAFactory API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    run_server(host, port, workers)
