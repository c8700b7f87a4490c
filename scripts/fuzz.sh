#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 30 s each) with
# cargo-fuzz on the nightly toolchain. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-30}; shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${SECS}s" >&2
  log=$(mktemp)
  if ! cargo +nightly fuzz run "$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2; echo "fuzz target $t FAILED" >&2; exit 1
  fi
  echo "$t: $(grep -E 'stat::number_of_executed_units' "$log" | tr -s ' ')"
  rm -f "$log"
done
