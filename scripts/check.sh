#!/usr/bin/env bash
# The static checks, before the tests (run by .ci/run and by pre-commit's hooks through .venv):
# ruff's lint rules and format check, and mypy on src/. Configuration: pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv test
status=0
echo "=== ruff check ===" >&2
.venv/bin/ruff check src tests bench scripts || status=1
echo "=== ruff format --check ===" >&2
.venv/bin/ruff format --check --output-format concise src tests bench scripts || status=1
echo "=== mypy src ===" >&2
.venv/bin/mypy src || status=1
exit "$status"
