#!/usr/bin/env bash
# Runs every test of nidan on a fresh machine: installs what is missing (when root), builds,
# runs the Rust test suite (SQLite and PostgreSQL), the OpenID Provider conformance check and the
# real-browser suite.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

install_packages() {
  local missing=()
  command -v node >/dev/null || missing+=(nodejs npm)
  command -v pg_ctl >/dev/null || [ -x /usr/local/bin/pg_ctl ] || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
  { [ -x /usr/sbin/slapd ] && command -v openssl >/dev/null; } || missing+=(slapd ldap-utils openssl)
  # The browser suite drives Debian's Chromium (never a downloaded browser); CJK fonts for the pages.
  [ -x /usr/bin/chromium ] || missing+=(chromium chromium-driver fonts-noto-cjk)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing packages: ${missing[*]} (install them, or run this script as root)" >&2
      exit 1
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_postgres() {
  # The tests create their own databases on the local server (127.0.0.1:5432, user postgres).
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then return; fi
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
}

install_packages
ensure_postgres

log "building"
cargo build --locked --bin nidan

# Every stage runs even when an earlier one failed, so one run shows every failure.
failed=()

log "Rust test suite"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --locked --no-fail-fast || failed+=("Rust tests")
else
  cargo test --locked --no-fail-fast || failed+=("Rust tests")
fi

log "OpenID Provider conformance"
if (cd conformance && npm ci --no-audit --no-fund --loglevel=error); then
  node conformance/run.mjs --nidan target/debug/nidan || failed+=("conformance")
else
  failed+=("conformance (npm ci)")
fi

log "Browser suite (headless Chromium, axe-core)"
if (cd browser && npm ci --no-audit --no-fund --loglevel=error); then
  node browser/run.mjs --nidan target/debug/nidan || failed+=("browser suite")
else
  failed+=("browser suite (npm ci)")
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf '\nfailed: %s\n' "${failed[*]}" >&2
  exit 1
fi
