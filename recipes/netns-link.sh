#!/usr/bin/env bash
# A real shaped link on one machine: `hat serve-cloud` and `hat run-edge` in two Linux network
# namespaces joined by a veth pair, each direction shaped with `tc netem` (rate + delay).
# Needs root and iproute2; shapes with the sch_netem kernel module where the kernel has it, else
# (with a warning) with run-edge's own link emulation over the veth link. Cleans up after itself.
#
# Usage: recipes/netns-link.sh [MBIT [RTT_MS]] [-- extra run-edge flags]
#   e.g. recipes/netns-link.sh 50 20 -- --mode u-shape --json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mbit=${1:-50}; rtt=${2:-20}
shift $(( $# >= 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
half=$(awk -v r="$rtt" 'BEGIN{printf "%.3f", r/2}')
cloud_ns=hat-cloud-$$; edge_ns=hat-edge-$$
cloud_ip=10.77.0.1; edge_ip=10.77.0.2

cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
hat=$PWD/target/release/hat
split=${HAT_RUNS:-runs}/split-default
[ -f "$split/cloud/manifest.json" ] || HAT_NO_PROGRESS=1 "$hat" split --out "$split" --force

cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  ip netns del "$cloud_ns" 2>/dev/null || true
  ip netns del "$edge_ns" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$cloud_ns"; ip netns add "$edge_ns"
ip link add "vc$$" type veth peer name "ve$$"
ip link set "vc$$" netns "$cloud_ns"; ip link set "ve$$" netns "$edge_ns"
ip -n "$cloud_ns" addr add "$cloud_ip/24" dev "vc$$"; ip -n "$edge_ns" addr add "$edge_ip/24" dev "ve$$"
for ns in "$cloud_ns" "$edge_ns"; do ip -n "$ns" link set lo up; done
ip -n "$cloud_ns" link set "vc$$" up; ip -n "$edge_ns" link set "ve$$" up
# Each side shapes what it sends: the edge's egress is the uplink, the cloud's the downlink.
emulate=()
if ip netns exec "$edge_ns" tc qdisc add dev "ve$$" root netem rate "${mbit}mbit" delay "${half}ms" limit 100000 2>/dev/null \
  && ip netns exec "$cloud_ns" tc qdisc add dev "vc$$" root netem rate "${mbit}mbit" delay "${half}ms" limit 100000; then
  shaping="tc netem"
else
  # No sch_netem in this kernel: keep the real veth link, shape with hat's own emulation.
  echo "netns-link: tc netem is not available here; using run-edge's link emulation over the veth link" >&2
  emulate=(--link-up-mbps "$mbit" --link-down-mbps "$mbit" --link-rtt-ms "$rtt")
  shaping="run-edge emulation"
fi

log=$(mktemp)
ip netns exec "$cloud_ns" "$hat" serve-cloud --bundle "$split/cloud" --listen "$cloud_ip:4433" \
  --state-dir "${HAT_RUNS:-runs}/cloud-state" >"$log" 2>/dev/null &
server=$!
for _ in $(seq 1 300); do grep -q '^fingerprint ' "$log" && break; sleep 0.1; done
fingerprint=$(awk '/^fingerprint /{print $2}' "$log")
echo "netns link: ${mbit} Mbit/s each way, ${rtt} ms RTT ($shaping), cloud at $cloud_ip" >&2
ip netns exec "$edge_ns" "$hat" run-edge --bundle "$split/device" --cloud "$cloud_ip:4433" \
  --cloud-fingerprint "$fingerprint" --prompt "${HAT_PROMPT:-Explain in three sentences why the sky is blue.}" \
  "${emulate[@]}" "$@"
