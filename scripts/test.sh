#!/usr/bin/env bash
# Install into .venv (if needed) and run the whole test suite against a real PostgreSQL:
# the embedded PostgreSQL 18 by default, or the server in DATABASE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv test
# The browser tests (tests/test_docs_browser.py, tests/test_console_browser.py) drive Debian's Chromium with Playwright
# (Playwright's own browser download cannot be used here). Install it when we can; when it is
# still missing, those tests say why (and fail under CI=true).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium for the browser test ..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "warning: apt-get could not install chromium" >&2
fi
# PgBouncer (Debian's) for tests/test_pooling.py, which starts its own in transaction mode.
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ] && [ "$(id -u)" = 0 ] \
  && command -v apt-get >/dev/null 2>&1; then
  echo "Installing pgbouncer for the pooling tests ..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer; } \
    >/dev/null 2>&1 || echo "warning: apt-get could not install pgbouncer" >&2
fi
exec .venv/bin/python -m pytest "$@"
