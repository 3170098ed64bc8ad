"""A throw-away PgBouncer in transaction mode in front of a PostgreSQL server (tests, CI, benchmarks).

    python scripts/pgbouncer.py --server postgresql://postgres@127.0.0.1:5432/postgres [--pool-size 2]
                                [--port P] [--user NAME ...]

runs one in the foreground until interrupted and prints its address; `start()` does the same from
Python (tests/conftest.py, bench/api.py). Its configuration lives in a temporary directory:

* `pool_mode = transaction`: each transaction gets whichever server connection is free, so any
  session state (SQL or protocol-level prepared statements, session SET, LISTEN) is lost or, worse,
  seen by another client. PgBouncer 1.18 (Debian bookworm) tracks no prepared statements at all.
* `default_pool_size` server connections per (database, user), fewer than the service's pool.
* `[databases] * = host=... port=...`: any database name is forwarded (the tests create one per test).
* `auth_type = trust`, users listed in the auth file: for a server that trusts local connections
  (the machine's PostgreSQL 15 on 127.0.0.1, the embedded server's socket). Not for production.

Needs the `pgbouncer` binary (Debian: `apt-get install pgbouncer`; PATH or /usr/sbin).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


def binary() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@dataclass
class Bouncer:
    port: int
    pool_size: int
    workdir: Path
    process: subprocess.Popen

    def url(self, conninfo: str) -> str:
        """`conninfo` (user, password, database, options) through this pooler."""
        params = conninfo_to_dict(conninfo)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Bouncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    server: str, *, users: list[str], pool_size: int = 2, port: int | None = None, max_client_conn: int = 2000
) -> Bouncer:
    """Start PgBouncer in front of the server of `server` (any conninfo; its host and port are used)
    and return once it listens. Raises FileNotFoundError when pgbouncer is not installed."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    target = conninfo_to_dict(server)
    host, server_port = target.get("host") or "127.0.0.1", target.get("port") or "5432"
    port = port or _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="iaf-pgbouncer-"))
    (workdir / "users.txt").write_text("".join(f"{_quote(u)} {_quote('')}\n" for u in dict.fromkeys(users)))
    (workdir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
stats_period = 3600
""")
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root; hand the directory to an unprivileged user.
        # A server reached through its socket directory: as that directory's owner, who can open it.
        user = Path(host).owner() if host.startswith("/") else "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(workdir, user)
        for child in workdir.iterdir():
            shutil.chown(child, user)
        cmd = [exe, "-u", user, str(workdir / "pgbouncer.ini")]
    else:
        cmd = [exe, str(workdir / "pgbouncer.ini")]
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stderr is not None
    seen: list[str] = []
    # PgBouncer logs "process up" once it listens: wait for that line (or for it to exit).
    for line in process.stderr:
        seen.append(line)
        if "process up" in line:
            break
    else:
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"pgbouncer exited with {process.returncode}:\n{''.join(seen[-20:])}")
    # Keep draining its log so that a full pipe never blocks it.
    threading.Thread(target=_drain, args=(process.stderr, workdir / "pgbouncer.log"), daemon=True).start()
    return Bouncer(port, pool_size, workdir, process)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _drain(stream: object, path: Path) -> None:
    try:
        with open(path, "a") as log:
            for line in stream:  # type: ignore[attr-defined]
                log.write(line)
    except (OSError, ValueError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("DATABASE_URL"), help="the server (default DATABASE_URL)")
    parser.add_argument("--pool-size", type=int, default=2, help="server connections per database and user")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--user",
        action="append",
        default=None,
        help="user allowed to log in (repeatable; default: postgres and iafactory_app)",
    )
    args = parser.parse_args()
    if not args.server:
        parser.error("--server or DATABASE_URL is required")
    bouncer = start(
        args.server, users=args.user or ["postgres", "iafactory_app"], pool_size=args.pool_size, port=args.port
    )
    print(
        f"pgbouncer (transaction mode, {args.pool_size} server connections per database and user) on "
        f"127.0.0.1:{bouncer.port}; e.g. IAFACTORY_APP_DATABASE_URL="
        f"{bouncer.url(make_conninfo(args.server, user='iafactory_app', password='...'))}",
        flush=True,
    )
    try:
        bouncer.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        bouncer.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
