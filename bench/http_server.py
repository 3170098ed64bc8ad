"""The HTTP server under normal and hostile clients: uvicorn's httptools and h11 protocols as they
come, against the protocol `iafactory serve` runs (iafactory/http/protocol.py: httptools with
header size, count and time limits).

    python bench/http_server.py [--seconds 5] [--connections 16] [--database-url URL]

For each server variant (one process each, the real app, a throw-away migrated database):
1. Normal load: wrk (C, `apt-get install wrk`) on GET /healthz and GET /openapi.json over
   --connections keep-alive connections: req/s, and the server's CPU microseconds per request
   from /proc (the figure that does not depend on how busy the machine is).
2. Hostile clients, the defects' own scenarios: one 50 MB header; ten of them in parallel;
   100,000 headers; a client sending half a header. For each: the status line answered (or
   "closed"), the wall time until the server answered or closed, and the server's resident memory
   before and after (MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import BENCH_SECRET_ENV, bench_settings, create_database, drop_database, free_port, server_url
from iafactory.db import bootstrap

HOST = "127.0.0.1"
SERVER = """
import functools, sys, uvicorn
from iafactory.config import Settings
from iafactory.serve import uvicorn_options
variant, port = sys.argv[1], int(sys.argv[2])
options = uvicorn_options(Settings())
if variant != "iafactory":
    options["http"] = variant  # uvicorn's own "httptools" or "h11", as they come
uvicorn.run("iafactory.app:create_app", factory=True, host="127.0.0.1", port=port, **options)
"""
VARIANTS = ("httptools", "h11", "iafactory")
LABELS = {
    "httptools": "uvicorn httptools (stock)",
    "h11": "uvicorn h11 (stock)",
    "iafactory": "iafactory (httptools + limits)",
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def start(variant: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, variant, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            if "Uvicorn running on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(120) or proc.poll() is not None:
        raise SystemExit(f"{variant}: server did not start")
    return proc, port


def wrk(port: int, path: str, seconds: int, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", f"http://{HOST}:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk reported errors:\n{out}")
    return requests


def hostile(port: int, payload: bytes, wait: float = 60.0) -> tuple[str, float]:
    """Send `payload` (as much as the server takes), then read: (first line or 'closed', seconds)."""
    started = time.perf_counter()
    sock = socket.create_connection((HOST, port), timeout=wait)
    sock.settimeout(wait)
    view = memoryview(payload)
    try:
        for i in range(0, len(view), 1 << 16):
            sock.sendall(view[i : i + (1 << 16)])
        data = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        data = b""
    except TimeoutError:
        data = b"(no answer, still open)"
    finally:
        sock.close()
    line = data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    return line, time.perf_counter() - started


def hostile_parallel(port: int, payload: bytes, n: int) -> tuple[str, float]:
    results: list[tuple[str, float]] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda: results.append(hostile(port, payload))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = sorted({r[0] for r in results})
    return " / ".join(lines), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    url = server_url(args.database_url)
    name, admin = create_database(url, "iaf_bench_http")
    try:
        asyncio.run(bootstrap.migrate_and_prepare(admin, bench_settings(admin)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_")}
        env.update(
            BENCH_SECRET_ENV,
            DATABASE_URL=admin,
            IAFACTORY_LOG_LEVEL="INFO",
            IAFACTORY_RUN_WORKER="false",
            IAFACTORY_EMBEDDING_PROVIDER="none",
            IAFACTORY_HEADER_TIMEOUT_SECONDS="10",
        )
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; wrk -t1 "
            f"-c{args.connections}, {args.seconds} s per run\n"
        )
        print(f"{'server':<32}{'endpoint':<15}{'req/s':>9}{'CPU us/req':>12}")
        hostile_rows = []
        for variant in VARIANTS:
            proc, port = start(variant, env)
            try:
                for path in ("/healthz", "/openapi.json"):
                    wrk(port, path, 1, args.connections)  # warm-up
                    cpu0 = cpu_seconds(proc.pid)
                    n = wrk(port, path, args.seconds, args.connections)
                    cpu = cpu_seconds(proc.pid) - cpu0
                    print(f"{LABELS[variant]:<32}{path:<15}{n / args.seconds:>9.0f}{cpu / n * 1e6:>12.0f}", flush=True)
                big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 50_000_000 + b"\r\n\r\n"
                many = (
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                    + b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
                    + b"\r\n"
                )
                for label, run in (
                    ("one 50 MB header", partial(hostile, port, big)),
                    ("ten 50 MB headers", partial(hostile_parallel, port, big, 10)),
                    ("100,000 headers", partial(hostile, port, many)),
                    ("half a header", partial(hostile, port, b"GET / HTTP/1.1\r\nX-Slow: ", 30)),
                ):
                    before = rss_mib(proc.pid)
                    line, seconds = run()
                    hostile_rows.append((LABELS[variant], label, line, seconds, before, rss_mib(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(30)
        print(f"\n{'server':<32}{'client':<20}{'answer':<42}{'seconds':>8}{'RSS MiB before -> after':>26}")
        for server, label, line, seconds, before, after in hostile_rows:
            print(f"{server:<32}{label:<20}{line[:40]:<42}{seconds:>8.1f}{before:>14.0f} -> {after:<8.0f}")
    finally:
        drop_database(url, name)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
