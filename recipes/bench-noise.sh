#!/usr/bin/env bash
# What uplink noise (`run-edge --uplink-noise S`, the privacy defence that changes outputs) costs
# a real session: serve-cloud and run-edge as two one-core machines (taskset, --threads 1), f32
# on the wire, greedy, 64 tokens, the held-out prompts of benches/prompts.json, shipped adapter,
# run-edge's defaults otherwise. For each noise level: how many answers equal `hat generate`'s,
# the tokens before the first difference, tokens per round, drafts accepted and TBT (medians
# over the prompts). What the noise hides is `hat audit --defences noise=S` (recipes/audit.sh).
# About 10 minutes. Usage: recipes/bench-noise.sh [prompts, default 12] [noise levels, default "0 0.03 0.1 0.3 1"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-12}
levels=${2:-0 0.03 0.1 0.3 1}
source recipes/common.sh
out=$(mktemp -d)
cleanup+=("$out")
start_cloud 4640 "taskset -c 1 $hat --threads 1"
mapfile -t prompts < <(python3 -c 'import json,sys; ps=json.load(open("benches/prompts.json"))["prompts"]; [print(p["text"]) for p in ps[:int(sys.argv[1])]]' "$n")
for i in "${!prompts[@]}"; do
  taskset -c 0 "$hat" --threads 1 generate --max-tokens 64 --json --prompt "${prompts[$i]}" 2>/dev/null >"$out/gen-$i.json"
  for s in $levels; do
    taskset -c 0 "$hat" --threads 1 run-edge --bundle "$split/device" --cloud 127.0.0.1:4640 --cloud-fingerprint "$fp" \
      --wire-dtype f32 --max-tokens 64 --json --uplink-noise "$s" --prompt "${prompts[$i]}" 2>/dev/null >"$out/edge-$i-$s.json"
  done
  echo "prompt $((i + 1))/${#prompts[@]} done" >&2
done
python3 - "$out" "${#prompts[@]}" $levels <<'EOF'
import json, statistics, sys
out, n, levels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| uplink noise (× RMS) | answers equal to hat generate | tokens before the first difference (median) | tokens/round | drafts accepted | TBT ms |")
print("|---|---|---|---|---|---|")
for s in levels:
    same, prefix, tpr, acc, tbt = 0, [], [], [], []
    for i in range(n):
        g = json.load(open(f"{out}/gen-{i}.json"))["token_ids"]
        e = json.load(open(f"{out}/edge-{i}-{s}.json"))
        t = e["token_ids"]
        k = next((j for j, (a, b) in enumerate(zip(g, t)) if a != b), min(len(g), len(t)))
        same += g == t
        prefix.append(k)
        tpr.append(e["mean_accepted"]); acc.append(e["acceptance_rate"]); tbt.append(e["tbt_ms"])
    med = statistics.median
    print(f"| {s} | {same}/{n} | {med(prefix):.0f} | {med(tpr):.2f} | {100 * med(acc):.0f} % | {med(tbt):.1f} |")
EOF
