#!/usr/bin/env bash
# Cross-compiles edge-agent (release, without the `ble` feature: no libdbus for the
# target is needed) for the ARM gateways and smoke-tests each binary under qemu-user:
#   aarch64-unknown-linux-gnu       (gcc-aarch64-linux-gnu,   qemu-aarch64-static)
#   armv7-unknown-linux-gnueabihf   (gcc-arm-linux-gnueabihf, qemu-arm-static)
# Installs the Debian cross toolchains and qemu-user-static when missing (root or
# sudo) and adds the rustup targets (--no-install: uses only what is there). Says plainly,
# and exits 0, when something is missing or cannot be installed: pass --require to make that
# an error (exit 2).
#
# Builds go to their own target dir (target/cross) under `nice -n 15`, so they do not
# hold the workspace's target-dir lock. Results (sizes, smoke output) are printed and
# written to target/cross/cross-report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIRE=0
INSTALL=1
TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
for a in "$@"; do
  case "$a" in
    --require) REQUIRE=1 ;;
    --no-install) INSTALL=0 ;;
    aarch64|aarch64-unknown-linux-gnu) TARGETS=(aarch64-unknown-linux-gnu) ;;
    armv7|armv7-unknown-linux-gnueabihf) TARGETS=(armv7-unknown-linux-gnueabihf) ;;
    *) echo "usage: scripts/cross.sh [--require] [--no-install] [aarch64|armv7]" >&2; exit 64 ;;
  esac
done

unavailable() {
  echo "cross: SKIPPED: $*" >&2
  if [ "$REQUIRE" = 1 ]; then exit 2; fi
  exit 0
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi

# Per target: Debian gcc package, linker, sysroot, qemu binary.
declare -A GCC_PKG=([aarch64-unknown-linux-gnu]=gcc-aarch64-linux-gnu [armv7-unknown-linux-gnueabihf]=gcc-arm-linux-gnueabihf)
declare -A LIBC_PKG=([aarch64-unknown-linux-gnu]=libc6-dev-arm64-cross [armv7-unknown-linux-gnueabihf]=libc6-dev-armhf-cross)
declare -A LINKER=([aarch64-unknown-linux-gnu]=aarch64-linux-gnu-gcc [armv7-unknown-linux-gnueabihf]=arm-linux-gnueabihf-gcc)
declare -A SYSROOT=([aarch64-unknown-linux-gnu]=/usr/aarch64-linux-gnu [armv7-unknown-linux-gnueabihf]=/usr/arm-linux-gnueabihf)
declare -A QEMU=([aarch64-unknown-linux-gnu]=qemu-aarch64-static [armv7-unknown-linux-gnueabihf]=qemu-arm-static)

# 1. Debian packages (idempotent).
pkgs=(qemu-user-static)
for t in "${TARGETS[@]}"; do pkgs+=("${GCC_PKG[$t]}" "${LIBC_PKG[$t]}"); done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || unavailable "the cross toolchains are not installed (${missing[*]}); scripts/cross.sh installs them"
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    unavailable "not root and no sudo; cannot install ${missing[*]}"
  fi
  echo "cross: installing ${missing[*]}" >&2
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    unavailable "apt-get could not install ${missing[*]}"
  fi
fi

# 2. Rust standard libraries for the targets.
command -v rustup >/dev/null 2>&1 || unavailable "rustup not found: cannot add the Rust targets ${TARGETS[*]}"
for t in "${TARGETS[@]}"; do
  if ! rustup target list --installed | grep -qx "$t"; then
    [ "$INSTALL" = 1 ] || unavailable "the Rust target $t is not installed; scripts/cross.sh adds it"
    echo "cross: rustup target add $t" >&2
    rustup target add "$t" >&2 || unavailable "the Rust target $t cannot be installed (rustup target add failed)"
  fi
done

# 3. Build and smoke-test.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cross}"
mkdir -p "$CARGO_TARGET_DIR"
REPORT="$CARGO_TARGET_DIR/cross-report.txt"
: > "$REPORT"
SMOKE_DIR=$(mktemp -d)
trap 'rm -rf "$SMOKE_DIR"' EXIT
# A config check-config accepts: the example, with a token file of mode 0600 beside it.
cp edge-agent/agent.example.toml "$SMOKE_DIR/agent.toml"
printf 'vgt_cross_smoke_token\n' > "$SMOKE_DIR/gateway.token"
chmod 600 "$SMOKE_DIR/gateway.token"

for t in "${TARGETS[@]}"; do
  envt=$(echo "$t" | tr 'a-z-' 'A-Z_')
  linker="${LINKER[$t]}"
  export "CARGO_TARGET_${envt}_LINKER=$linker"
  # cc-built C code (ring, zstd) uses the same cross compiler.
  export "CC_${t//-/_}=$linker"
  export "AR_${t//-/_}=${linker%-gcc}-ar"
  echo "cross: building edge-agent for $t (release, --no-default-features)" >&2
  nice -n 15 cargo build --locked --release -p edge-agent --bin edge-agent \
    --no-default-features --target "$t" >&2
  bin="$CARGO_TARGET_DIR/$t/release/edge-agent"
  size=$(stat -c %s "$bin")
  file_info=$(file -b "$bin" 2>/dev/null | cut -d, -f1-2 || true)
  qemu="${QEMU[$t]}"
  version=$("$qemu" -L "${SYSROOT[$t]}" "$bin" --version)
  check=$("$qemu" -L "${SYSROOT[$t]}" "$bin" check-config --config "$SMOKE_DIR/agent.toml" 2>&1)
  {
    echo "$t: $bin"
    echo "  size: $size bytes ($((size / 1024 / 1024)) MiB) ${file_info}"
    echo "  $qemu --version: $version"
    echo "  $qemu check-config: $check"
  } | tee -a "$REPORT"
done
echo "cross: ok (${TARGETS[*]})" | tee -a "$REPORT"
