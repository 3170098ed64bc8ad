"""The embedded default's secrets: generated on first start, kept in the data directory.

One JSON file, mode 0600, written whole to a private temporary file and then hard-linked into
place. A link never replaces an existing file, so when several processes start together (serve
workers, a worker next to serve) exactly one of them publishes its secrets and every process
reads that same file; nobody ever sees it half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path

from iafactory.config import ConfigError

FILE_NAME = "secrets.json"
GENERATED = ("jwt_secret", "api_key_secret", "app_db_password")


def path_in(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def load_or_create(data_dir: Path) -> dict[str, str]:
    """The stored secrets, created first if there are none yet."""
    path = path_in(data_dir)
    if not path.exists():
        _publish(data_dir, {name: secrets.token_urlsafe(48) for name in GENERATED})
    return _read(path)


def _publish(data_dir: Path, values: dict[str, str]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", suffix=".tmp", dir=data_dir)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(values, out)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its file
            os.link(tmp, path_in(data_dir))
    finally:
        os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the new name durable (not possible everywhere)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path) -> dict[str, str]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{path} is readable by other users (mode {mode:o}): run chmod 600 {path}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the stored secrets in {path}: {err}") from err
    missing = [name for name in GENERATED if not isinstance(values.get(name), str) or not values[name]]
    if missing:
        raise ConfigError(
            f"{path} lacks {', '.join(missing)}: restore it from a backup, or delete it to "
            "generate new secrets (existing sessions and API keys stop working)"
        )
    return {name: values[name] for name in GENERATED}
