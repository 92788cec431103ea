#!/usr/bin/env bash
# Benchmarks nidan against the certified oidc-provider (npm) and an axum hello-world on this
# machine, loopback only, and prints the result table. See bench/README.md.
#
#   bench/run.sh [--update-readme] [--rounds N] [--duration S] [--login-duration S] [--only WORD]
#
# Environment: NIDAN_BENCH_NO_BUILD=1 uses the binaries already built;
#              NIDAN_BENCH_BIN=PATH benchmarks that nidan binary instead of target/release/nidan.
# The measuring part is bounded by `timeout` (15 minutes); the default settings take about 7.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
cd "$REPO"

say() { printf '[run.sh] %s\n' "$*" >&2; }

# Tools: wrk (Debian) and Node.js >= 20.
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else
    say "wrk is missing: apt-get install wrk"; exit 1
  fi
fi
if ! command -v node >/dev/null 2>&1 || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  say "Node.js >= 20 is required"; exit 1
fi
if [ ! -d "$HERE/node_modules/oidc-provider" ] || [ ! -d "$HERE/node_modules/argon2" ] \
   || [ "$HERE/package-lock.json" -nt "$HERE/node_modules/.package-lock.json" ]; then
  say "npm ci (oidc-provider, argon2 — exact pins from bench/package-lock.json)"
  npm ci --prefix "$HERE" --no-audit --no-fund >/dev/null
fi

NIDAN_BIN="${NIDAN_BENCH_BIN:-$REPO/target/release/nidan}"
if [ "${NIDAN_BENCH_NO_BUILD:-0}" != 1 ]; then
  # One cargo command at a time.
  if [ -z "${NIDAN_BENCH_BIN:-}" ]; then
    say "cargo build --release --bin nidan"
    cargo build --release --locked --bin nidan
  fi
  say "building the axum hello-world (bench/hello)"
  CARGO_TARGET_DIR="$HERE/hello/target" cargo build --release --locked --manifest-path "$HERE/hello/Cargo.toml"
  say "building the argon2id timer (bench/argon2-verify)"
  CARGO_TARGET_DIR="$HERE/argon2-verify/target" cargo build --release --locked --manifest-path "$HERE/argon2-verify/Cargo.toml"
fi

say "measuring (loopback only; bounded to 15 minutes)"
exec timeout --signal=TERM --kill-after=30 900 node "$HERE/bench.mjs" --nidan "$NIDAN_BIN" "$@"
