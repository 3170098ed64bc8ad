"""What a fresh `pip install .` (no extras) gives must be enough to run the code: every module
that src/ imports belongs to a distribution declared in [project.dependencies], not one that only
the `test` extra (or a dependency's own requirements) happens to bring along."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import sys
import tomllib

import pytest

from conftest import REPO

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): the package's declared
# dependencies and data, no database.
pytestmark = pytest.mark.server_independent

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _imported_top_level_modules() -> dict[str, set[str]]:
    """Top-level module name -> files of src/ that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_in_src_is_a_runtime_dependency() -> None:
    runtime = _requirement_names(PYPROJECT["project"]["dependencies"])
    test_only = _requirement_names(PYPROJECT["project"]["optional-dependencies"]["test"]) - runtime
    distributions = importlib.metadata.packages_distributions()
    # Optional features (`pip install 'iafactory[otel]'`) are imported only by their own module, and
    # only when the feature is switched on.
    optional = {
        extra: _requirement_names(reqs)
        for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()
        if extra != "test"
    }
    optional_modules = {"otel": {"src/iafactory/observability/tracing.py"}}
    undeclared = {}
    for module, files in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module == "iafactory":
            continue
        dists = {_normalise(d) for d in distributions.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed at all"
        if any(dists & optional[extra] and set(files) <= optional_modules.get(extra, set()) for extra in optional):
            continue
        if not dists & runtime:
            undeclared[module] = (sorted(dists), sorted(files), "test extra only" if dists & test_only else "")
    assert undeclared == {}, f"imported by src/ but not in [project.dependencies]: {undeclared}"


def test_every_file_of_the_migrations_directory_is_package_data() -> None:
    """The runner reads the .sql files and superseded_checksums.txt from the installed package."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["iafactory.db"]
    directory = REPO / "src" / "iafactory" / "db" / "migrations"
    files = [p.relative_to(directory.parent).as_posix() for p in directory.iterdir() if p.is_file()]
    assert any(f.endswith(".txt") for f in files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
