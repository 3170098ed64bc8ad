"""scripts/_venv.sh (what demo.sh and test.sh run first), with real venvs and a real pip, on a tiny
project of its own, offline: no index, and a build backend inside the project (PEP 517
`backend-path`) so that pip needs nothing it would have to download."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): scripts/_venv.sh on a
# project of its own, no database.
pytestmark = pytest.mark.server_independent

PYPROJECT = """\
[build-system]
requires = []
build-backend = "tiny_backend"
backend-path = ["."]

[project]
name = "tiny-venv-check"
version = "{version}"
dependencies = []

[project.optional-dependencies]
test = []
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "_venv.sh", tmp_path / "scripts" / "_venv.sh")
    (tmp_path / "tiny.py").write_text("VALUE = 1\n")
    shutil.copy(REPO / "tests" / "data" / "tiny_backend.py", tmp_path / "tiny_backend.py")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(version="1.0"))
    return tmp_path


def ensure_venv(project: Path, extra: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    # Offline: nothing from an index (the upgrade of pip finds nothing newer and is a no-op).
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    env["PYTHON"] = shutil.which("python3") or "python3"
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . scripts/_venv.sh; ensure_venv {extra}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def installed_version(project: Path) -> str:
    out = subprocess.run(
        [
            str(project / ".venv" / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('tiny-venv-check'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def markers(project: Path) -> list[str]:
    return sorted(p.name for p in (project / ".venv").glob(".installed*"))


def test_failed_install_leaves_no_marker_and_the_next_run_installs(project: Path) -> None:
    (project / "pyproject.toml").write_text("[project\nthis is not TOML\n")
    failed = ensure_venv(project)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].startswith("error: installing into .venv failed")
    assert markers(project) == []

    (project / "pyproject.toml").write_text(PYPROJECT.format(version="1.0"))
    ok = ensure_venv(project)
    assert ok.returncode == 0, ok.stderr
    assert "Installing into .venv" in ok.stderr
    assert markers(project) == [".installed-runtime"]
    assert installed_version(project) == "1.0"

    again = ensure_venv(project)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""


def test_marker_follows_the_extra_and_the_content_of_pyproject(project: Path) -> None:
    assert ensure_venv(project, "test").returncode == 0
    assert markers(project) == [".installed-runtime", ".installed-test"]
    # The test extra includes the runtime dependencies: demo.sh after test.sh installs nothing.
    assert ensure_venv(project).stderr == ""

    # A pyproject.toml with other content but an older date (cp -p, tar, rsync -a) is installed.
    pyproject = project / "pyproject.toml"
    before = pyproject.stat()
    pyproject.write_text(PYPROJECT.format(version="2.0"))
    os.utime(pyproject, (before.st_atime - 3600, before.st_mtime - 3600))
    for marker in (project / ".venv").glob(".installed*"):
        os.utime(marker, (before.st_atime, before.st_mtime))
    result = ensure_venv(project)
    assert result.returncode == 0, result.stderr
    assert "Installing into .venv" in result.stderr
    assert installed_version(project) == "2.0"
    # The test extra's marker still names the old content: test.sh installs again.
    assert "Installing into .venv (with the test extra)" in ensure_venv(project, "test").stderr
