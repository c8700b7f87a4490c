#!/usr/bin/env bash
# Vigil demo: hub + simulated Masimo pulse oximeter on a PTY + edge agent,
# all on this machine (loopback only). Prints where to look, runs until
# Ctrl-C (or for N seconds with --for N). State lives in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PORT=${VIGIL_DEMO_PORT:-8080}
DURATION=""
if [ "${1:-}" = "--for" ]; then DURATION=${2:?--for needs seconds}; fi

bash scripts/setup.sh
echo "== building (first run takes a few minutes)" >&2
cargo build --workspace --bins --locked
BIN="$ROOT/target/debug"
DEMO="$ROOT/.demo"
mkdir -p "$DEMO"
cd "$DEMO"

cat > hub.toml <<TOML
[server]
bind = "127.0.0.1:$PORT"

[storage]
sqlite_path = "hub.sqlite"

[[associations]]
gateway_id = "gw-demo"
device_id = "masimo-1"
patient_id = "example-patient-1"
TOML

if [ ! -s gateway.token ]; then
  rm -f hub.sqlite hub.sqlite-wal hub.sqlite-shm
  rm -rf agent-data
  (umask 077; "$BIN/cloud-hub" gateway add gw-demo --config hub.toml > gateway.token)
fi

cat > agent.toml <<TOML
gateway_id = "gw-demo"
data_dir = "agent-data"

[uplink]
url = "http://127.0.0.1:$PORT/api/v1/ingest"
token_file = "gateway.token"
batch_max_wait_ms = 1000

[[device]]
kind = "masimo-serial"
id = "masimo-1"
port = "$DEMO/masimo-host"
location = "DEMO-WARD/bed-1"
TOML

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped; state kept in $DEMO" >&2
}
trap cleanup EXIT INT TERM

"$BIN/cloud-hub" serve --config hub.toml > hub.out 2> hub.log & pids+=($!)
socat pty,raw,echo=0,link="$DEMO/masimo-device" pty,raw,echo=0,link="$DEMO/masimo-host" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do [ -s hub.out ] && [ -e masimo-host ] && break; sleep 0.1; done
"$BIN/device-sim" masimo --port "$DEMO/masimo-device" --scenario desaturation 2> sim.log & pids+=($!)
"$BIN/edge-agent" run --config agent.toml 2> agent.log & pids+=($!)

BASE="http://127.0.0.1:$PORT"
Q="$BASE/fhir/Observation?patient=example-patient-1&code=http://loinc.org%7C59408-5&_sort=-date&_count=3"
cat <<TXT

Vigil demo is running (a simulated Masimo Radical-7 in a desaturation scenario, 1 reading/s):
  hub                $(cat hub.out)
  latest SpO2 (FHIR) $Q
  all observations   $BASE/fhir/Observation?patient=example-patient-1
  capability         $BASE/fhir/metadata
  hub metrics        $BASE/metrics
  health             $BASE/healthz  $BASE/readyz
  logs               $DEMO/{hub,agent,sim}.log
Press Ctrl-C to stop.
TXT

for _ in $(seq 30); do
  if curl -fsS "$Q" 2>/dev/null | grep -q '"valueQuantity"'; then
    echo; echo "First SpO2 observation arrived:"; curl -fsS "$Q" | head -c 1500; echo; break
  fi
  sleep 1
done

if [ -n "$DURATION" ]; then sleep "$DURATION"; else wait; fi
