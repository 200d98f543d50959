#!/usr/bin/env bash
# Trains the default model's draft adapter for the default split (K1 = K2 = 2) and installs it as
# the shipped default for that split (adapters/<split id>.safetensors, int8 storage, with its
# report beside it). Three stages, about 3 h 30 min on a 2-core CPU (2026-12-03):
#   1. from copies of middle layers (4 decoder layers + the feature fuse), on the model's own
#      replies to the first 2,000 ShareGPT prompts of the seeded shuffle: ~24 min generating
#      them (kept in runs/), 50 min of training steps, ~8 min of held-out evaluations;
#   2. from stage 1's weights (--init adapter:), on the next 2,500 prompts (--skip-conversations
#      2000, which stage 1 never saw): ~20 min generating, 40 min of training steps at half the
#      learning rate, ~6 min of evaluations;
#   3. from stage 2's weights, on the next 3,000 prompts (--skip-conversations 4500): ~25 min
#      generating, 40 min of training steps at 0.7x stage 2's learning rate, ~8 min of evaluations.
# The held-out conversations are the same in every stage (same --seed and --held-out).
# Usage: recipes/train-default-adapter.sh [extra train-adapter flags, given to every stage]
# HAT_ADAPTER_STAGES=1 or 2 stops after that stage (stage 1 was shipped until 2026-12-03,
# stage 2 until the eighth session's stage 3).
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

# Flags both stages share: the adapter's shape, the data, the loss, the held-out evaluation.
common=(--split "$split" --dataset assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json
  --adapter-layers 4 --conditioning features --self-distill 96 --held-out 16 --seq-len 256
  --batch-size 8 --steps 2000 --warmup 30 --feature-weight 0.5 --negatives 1024
  --eval-prompts 16 --checkpoint-every 50 --seed 0 --storage int8)

stage1=$runs/adapter-$split_id.safetensors
"$hat" train-adapter "${common[@]}" --out "$stage1" --init middle --max-conversations 2000 \
  --lr 2e-3 --time-budget 50 --eval-every 350 "$@"
out=$stage1

if [ "${HAT_ADAPTER_STAGES:-3}" -ge 2 ]; then
  stage2=$runs/adapter-$split_id-stage2.safetensors
  "$hat" train-adapter "${common[@]}" --out "$stage2" --init "adapter:$stage1" \
    --skip-conversations 2000 --max-conversations 2500 --lr 1e-3 --time-budget 40 --eval-every 400 "$@"
  out=$stage2
fi

if [ "${HAT_ADAPTER_STAGES:-3}" -ge 3 ]; then
  stage3=$runs/adapter-$split_id-stage3.safetensors
  "$hat" train-adapter "${common[@]}" --out "$stage3" --init "adapter:$stage2" \
    --skip-conversations 4500 --max-conversations 3000 --lr 7e-4 --time-budget 40 --eval-every 450 "$@"
  out=$stage3
fi

cp "$out" "adapters/$split_id.safetensors"
cp "${out%.safetensors}.report.json" "adapters/$split_id.report.json"
echo "installed adapters/$split_id.safetensors (from $out)"
