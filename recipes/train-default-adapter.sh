#!/usr/bin/env bash
# Trains the default model's draft adapter for the default split (K1 = K2 = 2), in about 85
# minutes on a 2-core CPU: ~24 min generating the model's own replies to 2,000 ShareGPT prompts
# (the self-distillation data, kept in runs/), 50 min of training steps (4 decoder layers) plus
# ~8 min of held-out evaluations and set-up, and installs it as the shipped default for that split
# (adapters/<split id>.safetensors, int8 storage, with its report beside it).
# Usage: recipes/train-default-adapter.sh [extra train-adapter flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
hat=./target/release/hat
runs=${HAT_RUNS:-runs}
split=$runs/split-default
mkdir -p "$runs" adapters
[ -f "$split/cloud/manifest.json" ] || HAT_NO_PROGRESS=1 "$hat" split --out "$split" --force --input-layers 2 --output-layers 2
split_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["split_id"])' "$split/device/manifest.json")
out=$runs/adapter-$split_id.safetensors

"$hat" train-adapter --split "$split" \
  --dataset assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json \
  --out "$out" --adapter-layers 4 --init middle --conditioning features \
  --self-distill 96 --max-conversations 2000 --held-out 16 --seq-len 256 --batch-size 8 \
  --steps 2000 --warmup 30 --lr 2e-3 --feature-weight 0.5 --negatives 1024 \
  --time-budget 50 --eval-every 350 --eval-prompts 16 --checkpoint-every 50 --seed 0 --storage int8 "$@"

cp "$out" "adapters/$split_id.safetensors"
cp "${out%.safetensors}.report.json" "adapters/$split_id.report.json"
echo "installed adapters/$split_id.safetensors"
