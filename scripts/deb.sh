#!/usr/bin/env bash
# Builds the gateway package (vigil-edge-agent_*.deb, `cargo deb -p edge-agent`) and checks it
# on this machine:
#   1. its contents and control data (dpkg-deb), the unit, conffile and sysusers file in place;
#   2. `dpkg -i` into this system: the postinst creates the vigil-edge user (in dialout) and
#      sets the config's permissions;
#   3. the service's ExecStartPre/ExecStart command lines, as the unit runs them (its user,
#      dialout, its environment, no new privileges), serve /healthz; SIGTERM stops it cleanly;
#      with systemd as PID 1 also `systemctl start` and `is-active`;
#   4. `dpkg --purge` (unless --keep).
# Installs cargo-deb when missing. The release build goes to target/cross under nice.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

if [ "$(id -u)" -ne 0 ]; then echo "deb: SKIPPED: dpkg -i needs root" >&2; exit 0; fi
if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "deb: installing cargo-deb" >&2
  nice -n 15 cargo install cargo-deb --locked >&2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cross}"
deb=$(nice -n 15 cargo deb -p edge-agent --locked 2>/dev/null | tail -n1)
[ -f "$deb" ] || { echo "deb: cargo deb did not produce a package" >&2; exit 1; }
echo "deb: built $deb ($(stat -c %s "$deb") bytes)"

# 1. Contents.
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/edge-agent ./etc/vigil/agent.toml ./usr/lib/sysusers.d/vigil-edge-agent.conf \
         ./usr/lib/systemd/system/vigil-edge-agent.service ./usr/share/doc/edge-agent/operations.md; do
  grep -q " $f\$" <<<"$contents" || { echo "deb: $f missing from the package" >&2; exit 1; }
done
dpkg-deb --field "$deb" Package Version Depends
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/vigil/agent.toml
echo "deb: contents ok"

# 2. Install.
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null 2>&1 || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -f >/dev/null   # pull its Depends
  dpkg -s vigil-edge-agent >/dev/null
}
id vigil-edge | grep -q '(dialout)' || { echo "deb: vigil-edge is not in dialout" >&2; exit 1; }
[ "$(stat -c '%U:%G %a' /etc/vigil/agent.toml)" = "root:vigil-edge 640" ] || { echo "deb: /etc/vigil/agent.toml permissions" >&2; exit 1; }
echo "deb: installed; user: $(id vigil-edge)"

# 3. Start as the unit does: a config pointing at a closed loopback hub port, a token.
unit=/usr/lib/systemd/system/vigil-edge-agent.service
cp /etc/vigil/agent.toml /tmp/vigil-deb-agent.toml.orig
sed -i 's|https://vigil-hub.example.org/api/v1/ingest|http://127.0.0.1:9/api/v1/ingest|' /etc/vigil/agent.toml
install -m 0600 -o vigil-edge -g vigil-edge /dev/stdin /etc/vigil/gateway.token <<<"vgt_deb_check"
install -d -m 0700 -o vigil-edge -g vigil-edge /var/lib/vigil-edge-agent
restore() {
  cp /tmp/vigil-deb-agent.toml.orig /etc/vigil/agent.toml
  rm -f /etc/vigil/gateway.token /tmp/vigil-deb-agent.toml.orig
  if [ "$KEEP" = 0 ]; then dpkg --purge vigil-edge-agent >/dev/null; rm -rf /var/lib/vigil-edge-agent; echo "deb: purged"; fi
}
trap restore EXIT
if [ "$(ps -p 1 -o comm=)" = systemd ]; then
  systemctl daemon-reload
  systemctl start vigil-edge-agent
  sleep 3
  systemctl is-active vigil-edge-agent
  curl -fsS http://127.0.0.1:9464/healthz; echo
  systemctl stop vigil-edge-agent
  echo "deb: started and stopped by systemd"
  exit 0
fi
echo "deb: PID 1 is $(ps -p 1 -o comm=), not systemd: running the unit's command lines under setpriv"
envs=$(sed -n 's/^Environment=//p' "$unit")
pre=$(sed -n 's/^ExecStartPre=//p' "$unit")
start=$(sed -n 's/^ExecStart=//p' "$unit")
as_unit=(setpriv --reuid vigil-edge --regid vigil-edge --groups "$(id -G vigil-edge | tr ' ' ,)" --no-new-privs --inh-caps=-all -- env -i PATH=/usr/bin:/bin $envs)
"${as_unit[@]}" $pre
"${as_unit[@]}" $start >/tmp/vigil-deb-agent.log 2>&1 &
pid=$!
for _ in $(seq 1 50); do
  if body=$(curl -fsS http://127.0.0.1:9464/healthz 2>/dev/null); then break; fi
  sleep 0.2
done
[ -n "${body:-}" ] || { echo "deb: /healthz did not answer" >&2; cat /tmp/vigil-deb-agent.log >&2; kill "$pid"; exit 1; }
echo "deb: /healthz: $body"
stat -c 'deb: buffer key %U %a' /var/lib/vigil-edge-agent/buffer.key
kill -TERM "$pid"
wait "$pid" && echo "deb: SIGTERM: clean exit"
