#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets, cargo-fuzz + libFuzzer with
# AddressSanitizer) for a bounded time, default 30 s each.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Works with the stable toolchain alone: cargo-fuzz passes nightly-only
# compiler flags (-Zsanitizer=address and friends), which RUSTC_BOOTSTRAP=1
# lets the installed compiler accept, so no nightly toolchain is fetched.
# A crash, leak or hang (an input running longer than 30 s) fails the script
# with the target's last output; the reproducer is left in
# fuzz/artifacts/<target>/ (replay: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>).
# Prints one line per target with the inputs executed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-30}; shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ $# -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
echo "== fuzz: building ${#targets[@]} targets ($(rustc -V))" >&2
# Default profile: optimised, with debug assertions and overflow checks.
[ $# -gt 0 ] || cargo fuzz build
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${SECS}s" >&2
  log=$(mktemp)
  if ! cargo fuzz run "$t" -- -max_total_time="$SECS" -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2; echo "fuzz target $t FAILED" >&2; rm -f "$log"; exit 1
  fi
  echo "$t: $(grep -E 'stat::number_of_executed_units' "$log" | tr -s ' ')"
  rm -f "$log"
done
