#!/usr/bin/env bash
# Install into .venv (if needed), start the embedded PostgreSQL (unless DATABASE_URL is set),
# migrate, load the demo tenants and users, and run the service.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv
exec .venv/bin/iafactory demo "$@"
