#!/usr/bin/env bash
# Vigil demo: a small simulated ward on this machine (loopback only).
#   hub (SQLite, dashboard at /ui/) + one gateway agent + simulated devices of
#   five kinds on socat PTY pairs, six beds of ward DEMO-WARD (one empty),
#   five patients, one of them deteriorating (IntelliVue "deteriorating"
#   scenario polled every 2 s: values drift for 4 minutes, NEWS2 reaches high within about 2).
# Prints the dashboard URL and a clinician login, runs until Ctrl-C (or for
# N seconds with --for N). State lives in .demo/ (delete it to start over).
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
WARD=DEMO-WARD
BASE="http://127.0.0.1:$PORT"

secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 28; }

cat > hub.toml <<TOML
[server]
bind = "127.0.0.1:$PORT"

[storage]
sqlite_path = "hub.sqlite"

[association]
# Bearer token of scripts (role admin); this script sets the ward up with it.
admin_token_file = "admin.token"
TOML

if [ ! -s gateway.token ] || [ ! -s clinician.password ]; then
  rm -f hub.sqlite hub.sqlite-wal hub.sqlite-shm
  rm -rf agent-data
  (umask 077
   echo "demo-admin-$(secret)$(secret)" > admin.token
   secret > clinician.password
   secret > biomed.password
   "$BIN/cloud-hub" gateway add gw-demo --config hub.toml > gateway.token)
  "$BIN/cloud-hub" --config hub.toml user add clinician --role clinician --password-file clinician.password
  "$BIN/cloud-hub" --config hub.toml user add biomed --role biomed --password-file biomed.password
fi

# bed  device-id     agent kind          simulator + arguments                  agent options
DEVICES=(
  "bed-1|intellivue-1|intellivue-serial|intellivue --scenario deteriorating --seed 1|poll_interval_ms = 2000"
  "bed-2|intellivue-2|intellivue-serial|intellivue --scenario stable --seed 2|poll_interval_ms = 2000"
  "bed-3|datex-1|datex-s5-serial|datex --scenario stable --interval-ms 1000|interval_s = 5"
  "bed-4|masimo-1|masimo-serial|masimo --scenario desaturation|"
  "bed-5|medibus-1|medibus-serial|medibus --scenario stable|poll_interval_ms = 2000"
  "bed-5|nonin-1|nonin-serial|nonin --scenario stable|"
)

{
  cat <<TOML
gateway_id = "gw-demo"
data_dir = "agent-data"

[uplink]
url = "$BASE/api/v1/ingest"
token_file = "gateway.token"
batch_max_wait_ms = 500
TOML
  for d in "${DEVICES[@]}"; do
    IFS='|' read -r bed id kind _ opts <<< "$d"
    printf '\n[[device]]\nkind = "%s"\nid = "%s"\nport = "%s"\nlocation = "%s/%s"\n[device.options]\n%s\n' \
      "$kind" "$id" "$DEMO/$id-host" "$WARD" "$bed" "$opts"
  done
} > agent.toml

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped; state kept in $DEMO" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN/cloud-hub" serve --config hub.toml > hub.out 2> hub.log & pids+=($!)
for d in "${DEVICES[@]}"; do
  IFS='|' read -r _ id _ _ _ <<< "$d"
  socat pty,raw,echo=0,link="$DEMO/$id-device" pty,raw,echo=0,link="$DEMO/$id-host" 2>/dev/null & pids+=($!)
done
for _ in $(seq 100); do [ -s hub.out ] && [ -e nonin-1-host ] && break; sleep 0.1; done
for d in "${DEVICES[@]}"; do
  IFS='|' read -r _ id _ sim _ <<< "$d"
  # shellcheck disable=SC2086 # the simulator's arguments are split on purpose
  "$BIN/device-sim" $sim --port "$DEMO/$id-device" 2> "$id-sim.log" & pids+=($!)
done
"$BIN/edge-agent" run --config agent.toml 2> agent.log & pids+=($!)

# The ward: beds, device placements, admissions (idempotent: a re-run's
# 409 "exists/occupied/already admitted" answers are expected).
ADMIN="Authorization: Bearer $(cat admin.token)"
post() { curl -sS -o /dev/null -w '%{http_code}' -X "$1" -H "$ADMIN" -H 'Content-Type: application/json' "$BASE$2" -d "$3"; }
for _ in $(seq 50); do curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
for n in 1 2 3 4 5 6; do
  post POST /api/v1/beds "{\"id\":\"bed-$n\",\"ward\":\"$WARD\",\"label\":\"Bed $n\"}" >/dev/null
done
for d in "${DEVICES[@]}"; do
  IFS='|' read -r bed id _ _ _ <<< "$d"
  post POST /api/v1/placements "{\"gateway_id\":\"gw-demo\",\"device_id\":\"$id\",\"bed_id\":\"$bed\"}" >/dev/null
done
for n in 1 2 3 4 5; do
  post POST /api/v1/patients/admit \
    "{\"patient\":{\"system\":\"urn:demo:mrn\",\"value\":\"demo-patient-$n\"},\"bed_id\":\"bed-$n\"}" >/dev/null
done
# NEWS2 needs consciousness (ACVPU) and air/oxygen, entered at the bedside
# and fresh for 15 min: record "alert, on air" now and every 10 min.
(while true; do
   for n in 1 2 3 4 5; do
     post PUT "/api/v1/patients/demo-patient-$n/manual-inputs" \
       '{"consciousness":"alert","supplemental_oxygen":false}' >/dev/null || true
   done
   for _ in $(seq 600); do sleep 1; done   # short sleeps: stops promptly with the demo
 done) & pids+=($!)

cat <<TXT

Vigil demo is running: ward $WARD, 5 patients in 6 beds, 6 simulated devices
(2 Philips IntelliVue, GE Datex S/5, Masimo Radical-7, Draeger ventilator, Nonin
oximeter) on one gateway; demo-patient-1 deteriorates (NEWS2 low to high within a few minutes).

  dashboard   $BASE/
              clinician login: clinician / $(cat clinician.password)
              biomedical engineer (Gateways & devices): biomed / $(cat biomed.password)
  FHIR        $BASE/fhir/Observation?patient=demo-patient-1&_count=5  (with a bearer token)
  hub         $(cat hub.out)
  metrics     $BASE/metrics
  logs        $DEMO/{hub,agent,*-sim}.log
Press Ctrl-C to stop.
TXT

for _ in $(seq 30); do
  if curl -fsS -H "$ADMIN" "$BASE/api/v1/wards/$WARD/overview" 2>/dev/null | grep -q '"vitals":\[{'; then
    echo; echo "First vitals arrived; open $BASE/ in a browser."; break
  fi
  sleep 1
done

# `wait` returns on a signal (a foreground `sleep` would delay the cleanup).
if [ -n "$DURATION" ]; then sleep "$DURATION" & pids+=($!); wait $!; else wait; fi
