#!/usr/bin/env bash
# Apply IAFactory's SQL migrations with nothing but psql (for hosts without Python).
#
#   scripts/run_migrations.sh          apply every pending migration, in order
#   scripts/run_migrations.sh 006      apply only 006 (refused while an earlier one is pending)
#   scripts/run_migrations.sh --check  show applied / pending / changed; writes nothing
#
# Database: DATABASE_URL (`DATABASE_URL=postgresql://` uses the PGHOST/PGUSER/... variables), or,
# without it, the embedded server of this checkout as `iafactory db url` finds it (when .venv exists).
# Nothing else: the script never guesses a server. Same rules and same tracking table
# (schema_migrations, SHA-256 checksums, superseded_checksums.txt) as `iafactory migrate`, and the
# same advisory lock, so the two can never run at the same time.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir="${IAFACTORY_MIGRATIONS_DIR:-$here/../src/iafactory/db/migrations}"
lock_key=7114614202512   # iafactory.db.migrate.ADVISORY_LOCK_KEY

die() { echo "error: $*" >&2; exit 1; }
q() { psql "$url" -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }

target=""
check=0
case "${1:-}" in
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --check) check=1 ;;
  "") ;;
  [0-9][0-9][0-9]) target="$1" ;;
  *) die "unknown argument '$1' (expected NNN, --check or nothing)" ;;
esac

command -v psql >/dev/null || die "psql not found"
command -v sha256sum >/dev/null || die "sha256sum not found"

# An explicit database, or none: a bare psql would migrate whatever its defaults reach.
if [ -n "${DATABASE_URL:-}" ]; then
  url=$DATABASE_URL
elif [ -x "$here/../.venv/bin/iafactory" ]; then
  url=$("$here/../.venv/bin/iafactory" db url) || die "could not get the embedded server's URL (iafactory db url failed)"
  echo "DATABASE_URL is not set: using $url (from .venv/bin/iafactory db url)" >&2
else
  die "no database: set DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/postgres), or run scripts/demo.sh once to use the embedded server"
fi

# Hold the advisory lock on a session of its own for the whole run; it opens no transaction, so
# CREATE INDEX CONCURRENTLY in a migration does not wait for it. While another runner holds it,
# poll pg_try_advisory_lock: a session blocked in pg_advisory_lock holds a snapshot, which the
# other runner's CREATE INDEX CONCURRENTLY would wait for, forever.
coproc LOCK { psql "$url" -X -q -A -t -v ON_ERROR_STOP=1 2>&1; }
waited=0
while :; do
  echo "SELECT pg_try_advisory_lock($lock_key);" >&"${LOCK[1]}"
  read -r -t 600 got <&"${LOCK[0]}" || die "could not take the migration lock (is the database reachable?)"
  [ "$got" = "t" ] && break
  [ "$got" = "f" ] || die "could not take the migration lock: $got"
  [ "$waited" -lt 6000 ] || die "another migration run has held the lock for 10 minutes"
  sleep 0.1; waited=$((waited + 1))
done
release() { exec {LOCK[1]}>&- 2>/dev/null || true; wait "$LOCK_PID" 2>/dev/null || true; }
trap release EXIT

declare -A applied=()
if [ "$(q -c "SELECT to_regclass('public.schema_migrations') IS NOT NULL")" = "t" ]; then
  while IFS='|' read -r v c; do
    [ -n "$v" ] && applied[$v]=$c
  done < <(q -c "SELECT version, checksum FROM schema_migrations ORDER BY version")
elif [ $check -eq 0 ]; then
  # Created here, not by --check (which writes nothing); the tracking table is not the
  # application's (the same revoke as 008's, which plain psql -f of 008 cannot do before it exists).
  q <<'SQL'
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS schema_migrations (
    version      varchar(10) PRIMARY KEY,
    name         text NOT NULL,
    checksum     char(64) NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    execution_ms integer,
    applied_by   text NOT NULL DEFAULT current_user,
    tool         text NOT NULL DEFAULT 'iafactory'
);
DO $$
BEGIN
    REVOKE ALL ON public.schema_migrations FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iaf_app') THEN
        REVOKE ALL ON public.schema_migrations FROM iaf_app;
    END IF;
END
$$;
SQL
fi

# Earlier texts of a migration accepted as applied: "NNN <sha256> <reason>" (see the file).
declare -A superseded=()
if [ -f "$dir/superseded_checksums.txt" ]; then
  while read -r v c _; do
    case "$v" in ''|\#*) continue ;; esac
    superseded["$v $c"]=1
  done < "$dir/superseded_checksums.txt"
fi

files=()
for f in "$dir"/[0-9][0-9][0-9]_*.sql; do files+=("$f"); done
[ ${#files[@]} -gt 0 ] || die "no migration files in $dir"

pending=()
changed=()
for f in "${files[@]}"; do
  base=$(basename "$f"); v=${base:0:3}
  sum=$(sha256sum "$f" | cut -c1-64)
  if [ -z "${applied[$v]:-}" ]; then
    state=pending; pending+=("$f")
  elif [ "${applied[$v]}" = "$sum" ] || [ -n "${superseded["$v ${applied[$v]}"]:-}" ]; then
    state=applied
  else
    state=changed; changed+=("$base")
  fi
  n=${base:4}; [ $check -eq 1 ] && printf "%s  %-40s %s\n" "$v" "${n%.sql}" "$state"
done
[ $check -eq 1 ] && exit 0

if [ ${#changed[@]} -gt 0 ]; then
  die "applied migration(s) changed since they ran: ${changed[*]}. Restore the original file(s) and put the change in a new migration."
fi

if [ -n "$target" ]; then
  [ -e "$(ls "$dir/${target}"_*.sql 2>/dev/null | head -1)" ] || die "no migration $target"
  if [ -n "${applied[$target]:-}" ]; then echo "$target is already applied."; exit 0; fi
  for f in "${pending[@]}"; do
    v=$(basename "$f"); v=${v:0:3}
    if [[ "$v" < "$target" ]]; then
      die "$target cannot run before $v: apply $v first (or run without an argument to apply everything in order)"
    fi
  done
  pending=("$(ls "$dir/${target}"_*.sql)")
fi

if [ ${#pending[@]} -eq 0 ]; then echo "Database is up to date."; exit 0; fi

for f in "${pending[@]}"; do
  base=$(basename "$f"); v=${base:0:3}; name=${base:4}; name=${name%.sql}
  sum=$(sha256sum "$f" | cut -c1-64)
  record="INSERT INTO schema_migrations (version, name, checksum, execution_ms, tool)
          VALUES ('$v', '$name', '$sum', :'ms', 'psql')"
  printf 'applying %s ... ' "$base"
  start=$(date +%s%3N)
  if head -1 "$f" | grep -q '^-- iafactory:no-transaction'; then
    if ! out=$(psql "$url" -X -q -v ON_ERROR_STOP=1 -c 'SET client_min_messages = warning' -f "$f" 2>&1); then
      echo "failed"
      for idx in $(q -c "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i
                          JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE NOT i.indisvalid AND n.nspname IN ('public', 'app')"); do
        q -c "DROP INDEX CONCURRENTLY IF EXISTS $idx" && echo "dropped invalid index $idx left behind" >&2
      done
      die "$base: $(echo "$out" | grep -m1 -E 'ERROR|FATAL' || echo "$out" | tail -1)"
    fi
    ms=$(( $(date +%s%3N) - start ))
    q -v ms="$ms" <<<"$record"
  else
    # One transaction for the file and its record: all or nothing.
    if ! out=$( (echo 'SET client_min_messages = warning;'; cat "$f"; echo; echo "$record;") \
                | psql "$url" -X -q -1 -v ON_ERROR_STOP=1 -v ms=0 -f - 2>&1); then
      echo "failed"
      die "$base: $(echo "$out" | grep -m1 -E 'ERROR|FATAL' || echo "$out" | tail -1)"
    fi
    ms=$(( $(date +%s%3N) - start ))
    q -c "UPDATE schema_migrations SET execution_ms = $ms WHERE version = '$v'"
  fi
  echo "ok (${ms} ms)"
done
