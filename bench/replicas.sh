#!/usr/bin/env bash
# Two nidan replicas on PostgreSQL against one on SQLite (client_credentials token and userinfo
# throughput), then a 10-minute soak of mixed traffic against the two replicas with errors and the
# RSS of each replica recorded. Loopback only. See "Replicas and soak" in bench/README.md.
#
#   bench/replicas.sh [--update-readme] [--rounds N] [--duration S] [--soak S] [--quiet-wait S]
#                     [--only compare|soak] [--keep]
#
# Environment: NIDAN_BENCH_BIN=PATH (default target/release/nidan, built when missing);
#              NIDAN_BENCH_PG=postgres://postgres@127.0.0.1:5432 (trust auth; a database
#              nidan_bench_<random> is created for the run and dropped afterwards).
# Bounded: the measuring part runs under `timeout` (19 minutes); with the defaults it takes about
# 14 minutes plus at most 3 minutes waiting for the 1-minute load average to fall below 2.5.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
cd "$REPO"

say() { printf '[replicas.sh] %s\n' "$*" >&2; }

for tool in wrk psql node; do
  command -v "$tool" >/dev/null 2>&1 || { say "$tool is missing (apt-get install wrk postgresql-client nodejs)"; exit 1; }
done
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then say "Node.js >= 20 is required"; exit 1; fi

NIDAN_BIN="${NIDAN_BENCH_BIN:-$REPO/target/release/nidan}"
if [ ! -x "$NIDAN_BIN" ]; then
  say "cargo build --release --bin nidan"
  cargo build --release --locked --bin nidan
fi

PG="${NIDAN_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
case "$PG" in
  postgres://*@127.0.0.1:*|postgres://*@127.0.0.1) ;;
  *) say "NIDAN_BENCH_PG must point at 127.0.0.1"; exit 1 ;;
esac
DB="nidan_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
say "creating database $DB"
psql "$PG/postgres" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB" >/dev/null
drop_db() {
  psql "$PG/postgres" -X -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 \
    && say "dropped database $DB" || say "could not drop database $DB: drop it by hand"
}
trap drop_db EXIT

say "measuring (loopback only; bounded to 19 minutes)"
rc=0
timeout --signal=TERM --kill-after=20 1140 node "$HERE/replicas.mjs" --nidan "$NIDAN_BIN" --pg "$PG" --database "$DB" "$@" || rc=$?
exit "$rc"
