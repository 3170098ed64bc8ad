"""What observability adds to each request, measured piece by piece (no server, no database):

    python bench/observability.py [--n 50000]

* the request metrics (counter + histogram), in-memory (one worker) and in multiprocess mode
  (several workers: values in mmap'ed files), run in a child process each, since
  prometheus_client picks its storage at import;
* the access-log line: the JSON formatter and a stream handler writing to /dev/null;
* the route template, from an ASGI scope.

Prints microseconds per request for each. Compare with bench/api.py's per-request latencies.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
from iafactory.observability import metrics
n = int(sys.argv[1])
started = time.perf_counter()
for i in range(n):
    metrics.observe_request("/api/v1/projects/{item_id}", "GET", 200, "pro", 0.004)
print((time.perf_counter() - started) / n * 1e6)
"""


def metrics_cost(n: int, multiprocess: bool) -> float:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryDirectory() as directory:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout)


def log_cost(n: int) -> float:
    from iafactory.observability import logs

    logger = logging.getLogger("bench.access")
    logger.propagate = False
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logs.JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        state = {"request_id": "a" * 32, "tenant_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "user_id": 42}
        token = logs.bind_state(state)
        fields = {
            **logs.context_fields(state),
            "method": "GET",
            "route": "/api/v1/projects/{item_id}",
            "status": 200,
            "duration_ms": 3.2,
            "client_ip": "127.0.0.1",
            "plan": "pro",
        }
        started = time.perf_counter()
        for _ in range(n):
            logger.info("%s %s %s %.1fms", "GET", "/api/v1/projects/{item_id}", 200, 3.2, extra={"fields": fields})
        elapsed = time.perf_counter() - started
        logs.unbind(token)
        logger.removeHandler(handler)
    return elapsed / n * 1e6


def route_cost(n: int) -> float:
    from iafactory.observability import metrics

    class Route:
        path_format = "/projects/{item_id}"

    scope = {"route": Route(), "path": "/api/v1/projects/123", "root_path": ""}
    started = time.perf_counter()
    for _ in range(n):
        metrics.route_template(scope)
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    args = parser.parse_args()
    rows = [
        ("request metrics, one worker (in memory)", metrics_cost(args.n, multiprocess=False)),
        ("request metrics, several workers (mmap files)", metrics_cost(args.n, multiprocess=True)),
        ("access-log line (JSON, to /dev/null)", log_cost(args.n)),
        ("route template", route_cost(args.n)),
    ]
    for label, micros in rows:
        print(f"{label:<48} {micros:8.1f} µs/request")


if __name__ == "__main__":
    main()
