#!/usr/bin/env bash
# Installs what Vigil's build, tests and demo need on a fresh Debian/Ubuntu
# machine. Idempotent: installs only what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: not root and no sudo; install manually: socat libdbus-1-dev pkg-config dbus python3-dbusmock mosquitto postgresql faketime chromium chromium-driver wrk openssl" >&2; fi
fi

# Debian packages needed by the tests and the demo.
#   socat: PTY pairs for the serial-device tests and the demo.
#   libdbus-1-dev, pkg-config: build btleplug (edge-agent's default `ble` feature).
#   dbus, python3-dbusmock: the BLE driver test mocks BlueZ on a private D-Bus
#     (dbus-daemon + firmware-shims/ble/mock_peripheral.py under /usr/bin/python3).
#   mosquitto: MQTT broker (and mosquitto_passwd) standing in for Azure IoT Hub in
#     edge-agent/tests/iothub_mqtt.rs.
#   postgresql: server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin) for the
#     hub's PostgreSQL backend tests (cloud-hub/tests/storage_suite.rs starts its own
#     throwaway server; the Debian service it installs is not used).
#   faketime: libfaketime, preloaded into the agent to jump the gateway clock in
#     tests/tests/fault_suite.rs.
#   chromium, chromium-driver: headless Chromium and its WebDriver server for the dashboard
#     browser test (tests/tests/dashboard_browser.rs).
PKGS=(socat libdbus-1-dev pkg-config dbus python3-dbusmock mosquitto postgresql faketime chromium chromium-driver)
#   wrk: the HTTP load generator of the FHIR API benchmark (cloud-hub/benches/fhir_load.rs,
#     run by `cargo xtask bench`, also --quick in CI).
PKGS+=(wrk)
#   openssl: the command line tool that makes the throwaway RSA key of the OIDC (RS256) test
#     (cloud-hub/tests/access.rs).
PKGS+=(openssl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python packages for the interop tests, pinned (installed only when missing).
#   pymodbus: the independent Modbus implementation that
#     firmware-shims/tests/modbus_interop.rs runs against Vigil's driver and simulator.
if ! python3 -c 'import sys, pymodbus; sys.exit(pymodbus.__version__ != "3.16.1")' >/dev/null 2>&1; then
  echo "setup: installing pymodbus 3.16.1" >&2
  python3 -m pip install --quiet 'pymodbus==3.16.1'
fi
#   hl7apy: the independent HL7 v2 implementation that builds the ORU^R01/ADT
#     messages of tests/py/hl7_interop.py (tests/tests/hl7_end_to_end.rs).
if ! python3 -c 'import sys, importlib.metadata as m; sys.exit(m.version("hl7apy") != "1.3.5")' >/dev/null 2>&1; then
  echo "setup: installing hl7apy 1.3.5" >&2
  python3 -m pip install --quiet 'hl7apy==1.3.5'
fi

#   fhir.resources 6.1.0 (FHIR R4 4.0.1 models; pydantic 1): the independent
#     FHIR validator that cloud-hub/tests/fhir_validator.rs runs over every
#     resource type the hub emits. Kept in its own virtualenv because it needs
#     pydantic 1 (later releases moved to R4B/R5). python3-venv provides venv.
FHIR_VENV="${VIGIL_FHIR_VENV:-$HOME/.cache/vigil/fhir-r4-venv}"
if ! "$FHIR_VENV/bin/python" -c 'import sys, fhir.resources as f; sys.exit(f.__fhir_version__ != "4.0.1")' >/dev/null 2>&1; then
  echo "setup: installing fhir.resources 6.1.0 (FHIR R4) into $FHIR_VENV" >&2
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$FHIR_VENV"
  python3 -m venv "$FHIR_VENV"
  "$FHIR_VENV/bin/pip" install --quiet 'fhir.resources==6.1.0' 'pydantic[email]==1.10.21'
fi

#   kubernetes-validate 1.37.0: validates the AKS manifests (deploy/aks) offline against the
#     Kubernetes JSON schemas it ships (tests/tests/deploy_aks.rs); its PyYAML also turns the
#     rendered YAML into JSON for the structural checks. Own virtualenv.
K8S_VENV="${VIGIL_K8S_VENV:-$HOME/.cache/vigil/k8s-venv}"
if ! "$K8S_VENV/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("kubernetes-validate") != "1.37.0")' >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate 1.37.0 into $K8S_VENV" >&2
  rm -rf "$K8S_VENV"
  python3 -m venv "$K8S_VENV"
  "$K8S_VENV/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi

#   pycep-parser 0.7.1 (Apache-2.0): a Bicep parser (Lark grammar). No Bicep compiler installs
#     from the registries reached here, so tests/tests/deploy_aks.rs parses the Azure template
#     (deploy/azure/eventhubs.bicep) with it: syntax and the resources it declares, not the
#     compiler's type checks. Own virtualenv.
BICEP_VENV="${VIGIL_BICEP_VENV:-$HOME/.cache/vigil/bicep-venv}"
if ! "$BICEP_VENV/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("pycep-parser") != "0.7.1")' >/dev/null 2>&1; then
  echo "setup: installing pycep-parser 0.7.1 into $BICEP_VENV" >&2
  rm -rf "$BICEP_VENV"
  python3 -m venv "$BICEP_VENV"
  "$BICEP_VENV/bin/pip" install --quiet 'pycep-parser==0.7.1' 'lark==1.3.1'
fi

#   pyarrow 26.0.1 + azure-storage-blob 12.31.1: the independent reader of the analytics lake
#     (cloud-hub/tests/lake.rs, benches/lake.rs): pyarrow reads the Parquet files back;
#     azure-storage-blob creates the test container in Azurite and downloads the blobs. Own
#     virtualenv.
LAKE_VENV="${VIGIL_LAKE_VENV:-$HOME/.cache/vigil/lake-venv}"
if ! "$LAKE_VENV/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("pyarrow") != "26.0.1" or m.version("azure-storage-blob") != "12.31.1")' >/dev/null 2>&1; then
  echo "setup: installing pyarrow 26.0.1 and azure-storage-blob 12.31.1 into $LAKE_VENV" >&2
  rm -rf "$LAKE_VENV"
  python3 -m venv "$LAKE_VENV"
  "$LAKE_VENV/bin/pip" install --quiet 'pyarrow==26.0.1' 'azure-storage-blob==12.31.1'
fi

#   Azurite 3.35.0 (MIT), the Azure Storage emulator the lake tests start on loopback (3.36+
#     need Node >= 21; Debian's Node is 20). Installed under ~/.cache/vigil/azurite (its
#     azurite-blob is found there by the tests, or set VIGIL_AZURITE_BLOB).
AZURITE_DIR="${VIGIL_AZURITE_DIR:-$HOME/.cache/vigil/azurite}"
if ! [ -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] \
  || [ "$(node -p "require('$AZURITE_DIR/node_modules/azurite/package.json').version" 2>/dev/null)" != "3.35.0" ]; then
  echo "setup: installing azurite 3.35.0 into $AZURITE_DIR" >&2
  if ! command -v npm >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  mkdir -p "$AZURITE_DIR"
  npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --silent 'azurite@3.35.0' >/dev/null
fi

# Rust toolchain pieces.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
#   cargo-fuzz: builds and runs the fuzz targets (scripts/fuzz.sh, CI) with the stable toolchain.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
#   tansu 0.6.0 (Apache-2.0): a Kafka-protocol broker in pure Rust, started on loopback by the
#     hub's Kafka / Event Hubs source tests (cloud-hub/tests/kafka_source.rs) and the fault
#     suite's Event Hubs path. Features: `dynostore` (its `memory://` storage engine) and
#     `libsql` (`sqlite://`: records survive a broker restart, which the tests do; builds the
#     SQLite C library and aws-lc). Shared by all checkouts (~/.cargo/bin); a stamp file
#     records the features installed.
TANSU_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
TANSU_STAMP="$TANSU_BIN_DIR/.tansu-0.6.0-dynostore-libsql"
if [ ! -f "$TANSU_STAMP" ] || ! "$TANSU_BIN_DIR/tansu" --version 2>/dev/null | grep -q '0\.6\.0'; then
  echo "setup: installing tansu 0.6.0 (dynostore, libsql)" >&2
  cargo install tansu --version 0.6.0 --locked --force --features dynostore,libsql
  touch "$TANSU_STAMP"
fi
echo "setup: ok" >&2
