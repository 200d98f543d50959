#!/usr/bin/env bash
# Adapter-training throughput on the default model: a short run, then a table of tokens/s and
# time per step (student forward, backward, optimiser) and of the one-off teacher pass.
# Usage: recipes/bench-train.sh [extra train-adapter flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
runs=${HAT_RUNS:-runs}; split=$runs/split-default
[ -f "$split/cloud/manifest.json" ] || HAT_NO_PROGRESS=1 ./target/release/hat split --out "$split" --force
out=$(mktemp -d)/bench.safetensors
HAT_NO_PROGRESS=1 ./target/release/hat train-adapter --split "$split" \
  --dataset assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json --out "$out" \
  --adapter-layers 2 --max-conversations 48 --held-out 4 --eval-prompts 1 --eval-tokens 16 \
  --batch-size 8 --steps 12 --eval-every 1000 --feature-weight 0.5 "$@" >/dev/null
python3 - "${out%.safetensors}.report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); t = r["time_per_step_ms"]; c = r["config"]
steps = r["steps_done"]; tok = sum(p["tokens"] for p in r["curve"]) / max(steps, 1)
print("| phase | value |"); print("|---|---|")
print(f"| teacher pass (once, {r['train_tokens']} tokens) | {r['teacher_seconds']:.1f} s = {r['train_tokens']/r['teacher_seconds']:.0f} tok/s |")
print(f"| student forward per step ({tok:.0f} tokens, batch {c['batch_size']}) | {t['student_forward']:.0f} ms |")
print(f"| backward per step | {t['backward']:.0f} ms |")
print(f"| optimiser per step | {t['optimizer']:.1f} ms |")
print(f"| training throughput | {t['tokens_per_s']:.0f} tok/s |")
PY
