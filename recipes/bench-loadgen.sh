#!/usr/bin/env bash
# The cloud under many sessions: `hat serve-cloud` (every core) loaded by `hat loadgen` with
# N = 1, 2, 4, 8, 16, 32 sessions (blocks of 5 rows advancing 2, closed loop), one markdown table:
# verification positions/s (and the ratio to one session), round latency p50/p99, the cloud's
# compute per block, the rest of a round, and the server's resident memory after each N.
# Usage: recipes/bench-loadgen.sh [seconds per N, default 10] [extra serve-cloud flags]
# (e.g. --no-batching); $HAT_LOADGEN_FLAGS go to every loadgen (e.g. "--block-rows 1 --advance 1").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-10}
shift || true
source recipes/common.sh
start_cloud 4620 "$hat" --max-sessions 40 --metrics 127.0.0.1:4621 "$@"
echo "| sessions | positions/s | × one session | round p50 ms | round p99 ms | cloud compute p50 ms | rest p50 ms | server RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
base=
for n in 1 2 4 8 16 32; do
  json=$("$hat" loadgen --bundle "$split/device" --cloud 127.0.0.1:4620 --cloud-fingerprint "$fp" --sessions "$n" --duration "$secs" --json ${HAT_LOADGEN_FLAGS:-})
  rss=$(curl -s 127.0.0.1:4621/metrics | sed -n 's/^hat_cloud_resident_memory_bytes //p')
  python3 - "$json" "$rss" "${base:-}" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); rss = float(sys.argv[2] or 0); base = float(sys.argv[3]) if sys.argv[3] else r["positions_per_s"]
print(f'| {r["sessions"]} | {r["positions_per_s"]:.0f} | {r["positions_per_s"]/base:.2f} | {r["round_ms_p50"]:.1f} | {r["round_ms_p99"]:.1f} | {r["cloud_compute_ms_p50"]:.1f} | {r["queue_ms_p50"]:.1f} | {rss/2**20:.0f} |')
PY
  [ -n "$base" ] || base=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["positions_per_s"])' "$json")
done
