# Sourced by demo.sh and test.sh: create .venv and install the project into it, again whenever
# pyproject.toml (its content, not its date) or the extra asked for is not what was installed.
#
# The marker .venv/.installed-<extra|runtime> holds the SHA-256 of pyproject.toml and the extra.
# It is removed before pip runs and written only after pip succeeded, so a failed or interrupted
# install is retried by the next command instead of being taken for done.
_venv_pyproject_hash() {
  "$1" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'
}

ensure_venv() {
  local extra="${1:-}"
  local py="${PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { echo "error: Python 3.11+ is required (found $("$py" --version 2>&1))" >&2; exit 1; }
  local want stamp
  want="$(_venv_pyproject_hash "$py") ${extra:-runtime}"
  stamp=".venv/.installed-${extra:-runtime}"
  [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0

  # A .venv left half-made (interrupted `python -m venv`) has a python but no pip: make it anew.
  if ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    rm -rf .venv
    "$py" -m venv .venv \
      || { echo "error: could not create .venv with $py (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  echo "Installing into .venv${extra:+ (with the $extra extra)} ..." >&2
  rm -f "$stamp"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 \
    && .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra:+[$extra]}" >&2 \
    || { echo "error: installing into .venv failed (see pip's output above); the next run tries again" >&2; exit 1; }
  echo "$want" > "$stamp"
  # Any extra installs the runtime dependencies too: the plain install is done as well.
  [ -z "$extra" ] || echo "$(_venv_pyproject_hash "$py") runtime" > .venv/.installed-runtime
}
