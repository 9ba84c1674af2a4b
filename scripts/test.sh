#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs all of them.
#
#   bash scripts/test.sh            # format check, clippy, every test
#   SYNCMESH_TEST_QUICK=1 bash scripts/test.sh   # tests only (no fmt/clippy)
#
# Tests run against real SQLite files and real gRPC on 127.0.0.1 only. They
# need no server today; when an engine needs one (PostgreSQL, MariaDB, Redis),
# this script installs it from Debian packages and the tests start throwaway
# instances in temporary directories.
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

# Debian's chromium renders the hub's status page in tests/tests/ops.rs.
if [ ! -x /usr/bin/chromium ]; then
    say "installing chromium (for the status page test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
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
