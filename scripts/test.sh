#!/usr/bin/env bash
# The full test suite: setup, formatting, lints, build, every test.
# This is the README's test command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (the end-to-end tests run them)" >&2
cargo build --workspace --bins --locked
echo "== tests" >&2
cargo nextest run --workspace --locked --no-fail-fast "$@"
