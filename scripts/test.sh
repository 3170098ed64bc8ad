#!/usr/bin/env bash
# Install into .venv (if needed) and run the whole test suite against a real PostgreSQL:
# the embedded PostgreSQL 18 by default, or the server in DATABASE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv test
exec .venv/bin/python -m pytest "$@"
