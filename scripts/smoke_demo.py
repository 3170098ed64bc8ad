#!/usr/bin/env python3
"""Smoke test of the README's first command, as a new user meets it: `bash scripts/demo.sh` in a
fresh `git clone`, with an empty HOME and a data directory of its own, on a free port.

Waits for /readyz, signs in with the demo credential that demo.sh printed, creates a
knowledge-base document, polls until it is indexed, finds it by search; then signs in as the
consultant demo.sh printed (an account in each of the demo's two region cells), checks that the
one sign-in lists tenants of both cells, selects the Algerian tenant (cell dz) and has a document
indexed and found there too (each cell has its own indexing queue). Then stops what it started:
the API (SIGTERM) and the embedded PostgreSQL (`iafactory db stop`). Exit status 0 only if every
step worked. Standard library only (it runs before any .venv exists).

    python3 scripts/smoke_demo.py [--source DIR_OR_URL] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

READY_TIMEOUT = 1800  # seconds: includes creating .venv and installing into it on a slow machine
INDEX_TIMEOUT = 180
STOP_TIMEOUT = 60


class SmokeFailure(Exception):
    pass


def log(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("accept", "application/json")
    if data is not None:
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        raise SmokeFailure(f"{method} {url} -> {err.code}: {text[:500]}") from None


def poll(what: str, timeout: float, probe, interval: float = 0.5):
    """Call probe() until it returns something other than None, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def clean_env(home: Path, data_dir: Path, port: int) -> dict[str, str]:
    """The caller's environment without anything that would point the demo elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        and not k.startswith(("IAFACTORY_", "XDG_", "PG"))
    }
    env.update(HOME=str(home), IAFACTORY_DATA_DIR=str(data_dir), IAFACTORY_PORT=str(port))
    return env


def processes_using(path: Path) -> list[int]:
    """Processes whose command line names `path` (Linux /proc; elsewhere nothing is found)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if str(path) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Demo:
    def __init__(self, source: str, root: Path) -> None:
        self.root = root
        self.clone = root / "clone"
        self.home = root / "home"
        self.data_dir = root / "data"
        self.output = root / "demo.log"
        self.home.mkdir()
        self.port = free_port()
        self.env = clean_env(self.home, self.data_dir, self.port)
        self.source = source
        self.proc: subprocess.Popen | None = None

    def iafactory(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.clone / ".venv" / "bin" / "iafactory"), *args],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def printed(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def start(self) -> float:
        subprocess.run(["git", "clone", "--quiet", self.source, str(self.clone)], check=True, env=self.env)
        if Path(self.source).is_dir():  # the commit checked out there (a worktree's HEAD is not the clone's)
            head = subprocess.run(
                ["git", "-C", self.source, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
            subprocess.run(["git", "-C", str(self.clone), "checkout", "--quiet", "--detach", head], check=True)
        log(
            f"cloned {self.source} into {self.clone}; HOME={self.home} IAFACTORY_DATA_DIR={self.data_dir} port {self.port}"
        )
        started = time.monotonic()
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "scripts/demo.sh"],
                cwd=self.clone,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def ready() -> bool | None:
            if self.proc.poll() is not None:
                raise SmokeFailure(f"demo.sh exited with status {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                    return True if r.status == 200 else None
            except (urllib.error.URLError, OSError):
                return None

        poll("/readyz", READY_TIMEOUT, ready)
        return time.monotonic() - started

    def stop_api(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise SmokeFailure(f"the API did not stop within {STOP_TIMEOUT} s of SIGTERM (killed)") from None

    def stop_database(self) -> subprocess.CompletedProcess | None:
        if not (self.clone / ".venv" / "bin" / "iafactory").exists():
            return None
        return self.iafactory("db", "stop")


def exercise(demo: Demo) -> None:
    printed = demo.printed()
    api = re.search(r"^API: (http://\S+/api/v1)\s", printed, re.M)
    credential = re.search(r'"email": "([^"]+)", "password": "([^"]+)"', printed)
    if not api or not credential:
        raise SmokeFailure("demo.sh did not print the API address and a demo credential")
    api_url, (email, password) = api.group(1), credential.groups()
    if api_url != f"http://127.0.0.1:{demo.port}/api/v1":
        raise SmokeFailure(f"demo.sh printed {api_url}, not the port it was given ({demo.port})")
    log(f"signing in as {email} (printed by demo.sh)")
    _, login = http("POST", f"{api_url}/auth/login", {"email": email, "password": password})
    token = login["access_token"]
    if login.get("tenant") is None:
        raise SmokeFailure(f"{email} has no tenant selected after sign-in: {login}")

    word = f"smoke{uuid.uuid4().hex[:10]}"
    status, doc = http(
        "POST",
        f"{api_url}/knowledge-base",
        {
            "title": "Procédure de sauvegarde",
            "content": f"# Sauvegardes\n\nLe cabinet sauvegarde les dossiers des patients chaque nuit. "
            f"Code de vérification : {word}.\n",
        },
        token,
    )
    if status != 201 or doc.get("index_status") != "pending":
        raise SmokeFailure(f"creating a document answered {status}: {doc}")
    log(f"document {doc['id']} created; waiting for its indexing")

    def indexed() -> dict | None:
        _, current = http("GET", f"{api_url}/knowledge-base/{doc['id']}", token=token)
        if current["index_status"] == "failed":
            raise SmokeFailure(f"indexing failed: {current.get('index_error')}")
        return current if current["index_status"] == "indexed" else None

    poll("document indexed", INDEX_TIMEOUT, indexed)
    for mode in ("keyword", "hybrid"):
        _, found = http("POST", f"{api_url}/knowledge-base/search", {"query": word, "mode": mode}, token)
        ids = [p["document_id"] for p in found["passages"]]
        if doc["id"] not in ids:
            raise SmokeFailure(f"{mode} search for {word!r} did not find document {doc['id']}: {found}")
    log("found by keyword and hybrid search")
    two_regions(printed, api_url)


def index_and_find(api_url: str, token: str, title: str, content: str, word: str) -> int:
    """Create a knowledge-base document as `token`'s tenant, wait for its indexing, find it by keyword."""
    status, doc = http("POST", f"{api_url}/knowledge-base", {"title": title, "content": content}, token)
    if status != 201 or doc.get("index_status") != "pending":
        raise SmokeFailure(f"creating a document answered {status}: {doc}")

    def indexed() -> dict | None:
        _, current = http("GET", f"{api_url}/knowledge-base/{doc['id']}", token=token)
        if current["index_status"] == "failed":
            raise SmokeFailure(f"indexing failed: {current.get('index_error')}")
        return current if current["index_status"] == "indexed" else None

    poll(f"document {doc['id']} indexed", INDEX_TIMEOUT, indexed)
    _, found = http("POST", f"{api_url}/knowledge-base/search", {"query": word, "mode": "keyword"}, token)
    if doc["id"] not in [p["document_id"] for p in found["passages"]]:
        raise SmokeFailure(f"keyword search for {word!r} did not find document {doc['id']}: {found}")
    return doc["id"]


def two_regions(printed: str, api_url: str) -> None:
    """The consultant's one sign-in lists tenants of both region cells; the DZ one works end to end."""
    line = re.search(r'^Two regions, one sign-in: .*"email": "([^"]+)", "password": "([^"]+)"', printed, re.M)
    if not line:
        raise SmokeFailure("demo.sh did not print the two-region sign-in (is the demo running two cells?)")
    email, password = line.groups()
    log(f"signing in as {email} (an account in each cell)")
    _, login = http("POST", f"{api_url}/auth/login", {"email": email, "password": password})
    cells = {t.get("cell") for t in login["tenants"]}
    if not {"dz", "eu"} <= cells:
        raise SmokeFailure(
            f"{email}'s sign-in lists tenants of cells {sorted(map(str, cells))}, not dz and eu: {login}"
        )
    dz = next(t for t in login["tenants"] if t["cell"] == "dz")
    _, chosen = http("POST", f"{api_url}/auth/select-tenant", {"tenant": dz["slug"]}, login["access_token"])
    if (chosen.get("tenant") or {}).get("cell") != "dz":
        raise SmokeFailure(f"selecting {dz['slug']} did not act in cell dz: {chosen}")
    word = f"smoke{uuid.uuid4().hex[:10]}"
    doc_id = index_and_find(
        api_url,
        chosen["access_token"],
        "Règlement intérieur",
        f"# Règlement\n\nLes élèves arrivent à 8 h. Code de vérification : {word}.\n",
        word,
    )
    log(
        f"tenants of cells {', '.join(sorted(cells))} after one sign-in; document {doc_id} indexed and found in {dz['slug']} (cell dz)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default=str(Path(__file__).resolve().parent.parent),
        help="repository to clone (default: this checkout's committed HEAD)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="iafactory-smoke-"))
    demo = Demo(args.source, root)
    failure: str | None = None
    try:
        ready_after = demo.start()
        log(f"demo.sh ready after {ready_after:.1f} s (fresh clone, .venv install included)")
        exercise(demo)
    except (SmokeFailure, subprocess.CalledProcessError, OSError, KeyError, ValueError) as err:
        failure = f"{type(err).__name__}: {err}" if not isinstance(err, SmokeFailure) else str(err)
    finally:
        try:
            demo.stop_api()
        except SmokeFailure as err:
            failure = failure or str(err)
        stopped = demo.stop_database()
        if stopped is not None and stopped.returncode != 0:
            failure = failure or f"iafactory db stop failed: {stopped.stderr.strip()}"
        elif stopped is not None:
            log(stopped.stdout.strip())
        # pg_ctl returns once the server removed its pid file; its processes may take a moment more.
        try:
            leftovers = []
            poll("processes to exit", 15, lambda: None if processes_using(demo.root) else True, interval=0.2)
        except SmokeFailure:
            leftovers = processes_using(demo.root)
        if leftovers:
            failure = failure or f"processes still running after the stop: {leftovers}"
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if failure:
            tail = "\n".join(demo.printed().splitlines()[-40:])
            print(f"--- last lines demo.sh printed ---\n{tail}\n---", file=sys.stderr)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failure:
        print(f"smoke: FAILED: {failure}", file=sys.stderr)
        return 1
    log(
        "ok: demo.sh on a fresh clone serves two region cells, signs in (one sign-in reaching both cells), "
        "indexes and finds a document in each cell, and stops cleanly"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
