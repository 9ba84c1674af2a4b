#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs all of them.
#
#   bash scripts/test.sh            # format check, clippy, every test
#   SYNCMESH_TEST_QUICK=1 bash scripts/test.sh   # tests only (no fmt/clippy)
#
# Tests run against real SQLite files, real gRPC on 127.0.0.1 and real
# PostgreSQL 15 servers: this script installs `postgresql-15` from Debian
# when its server binaries are missing, and the tests start throwaway
# clusters (initdb in a temp dir, 127.0.0.1, wal_level=logical) as the
# `postgres` system user the package creates (see tests/src/pg.rs).
# Likewise `mariadb-server` for the MariaDB tests (tests/src/mariadb.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install Rust (rustup) first" >&2
    exit 1
fi
# gcc builds the bundled SQLite; protoc is vendored (protoc-bin-vendored).
if ! command -v cc >/dev/null 2>&1; then
    say "installing a C compiler (for the bundled SQLite)"
    apt-get update -qq && apt-get install -y -qq gcc >/dev/null
fi

# Servers the end-to-end tests start as throwaway instances on 127.0.0.1.
need_pkgs=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql-15)
[ -x /usr/bin/redis-server ] || need_pkgs+=(redis-server)
# chromium renders the hub's status page in tests/tests/ops.rs.
[ -x /usr/bin/chromium ] || need_pkgs+=(chromium)
[ -x /usr/sbin/mariadbd ] || need_pkgs+=(mariadb-server)
# The PostgreSQL TLS test makes its CA and server certificate with it.
[ -x /usr/bin/openssl ] || need_pkgs+=(openssl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing ${need_pkgs[*]} (Debian packages; the tests start their own instances)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# Debian starts system services after install; the tests use their own
# instances on free ports, so those are not needed.
if command -v systemctl >/dev/null 2>&1; then
    systemctl stop redis-server postgresql mariadb >/dev/null 2>&1 || true
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if [ -z "${SYNCMESH_TEST_QUICK:-}" ]; then
    say "cargo fmt --check"
    cargo fmt --all -- --check
    say "cargo clippy -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings
fi

say "cargo build -p syncmesh (the process-level tests run the binary)"
cargo build -p syncmesh --locked

say "cargo test (unit, property, end-to-end)"
cargo test --workspace --locked --no-fail-fast
