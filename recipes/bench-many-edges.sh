#!/usr/bin/env bash
# N real edges at once against one `hat serve-cloud` (batching on, both cores): each
# `hat run-edge --threads 1` answers a different held-out prompt (benches/prompts.json), greedy,
# f32 on the wire, 32 tokens; every output is compared with `hat generate`'s, and the cloud's
# peak RSS and its passes (blocks per pass, from its metrics) are printed.
# Usage: recipes/bench-many-edges.sh [N, default 16]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-16}
source recipes/common.sh
out=$(mktemp -d)
cleanup+=("$out")
start_cloud 4630 "$hat" --max-sessions "$((n + 4))" --metrics 127.0.0.1:4631
mapfile -t prompts < <(python3 -c 'import json,sys; ps=json.load(open("benches/prompts.json"))["prompts"]; [print(ps[i % len(ps)]["text"]) for i in range(int(sys.argv[1]))]' "$n")
pids=()
for i in $(seq 0 $((n - 1))); do
  "$hat" --threads 1 run-edge --bundle "$split/device" --cloud 127.0.0.1:4630 --cloud-fingerprint "$fp" --wire-dtype f32 --max-tokens 32 --json --prompt "${prompts[$i]}" >"$out/edge-$i.json" 2>/dev/null &
  pids+=($!)
done
wait "${pids[@]}"
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$cloud/status")
same=0
for i in $(seq 0 $((n - 1))); do
  "$hat" generate --max-tokens 32 --json --prompt "${prompts[$i]}" 2>/dev/null >"$out/gen-$i.json"
  if python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); sys.exit(0 if a["token_ids"]==b["token_ids"] else 1)' "$out/edge-$i.json" "$out/gen-$i.json"; then same=$((same + 1)); fi
done
metrics=$(curl -s 127.0.0.1:4631/metrics)
blocks=$(sed -n 's/^hat_cloud_pass_blocks_sum //p' <<<"$metrics")
passes=$(sed -n 's/^hat_cloud_pass_blocks_count //p' <<<"$metrics")
echo "$n edges at once: $same/$n outputs equal to hat generate; cloud peak RSS $((hwm / 1024)) MiB; $blocks blocks in $passes passes"
[ "$same" -eq "$n" ]
