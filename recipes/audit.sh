#!/usr/bin/env bash
# hat audit on the default model: what a curious cloud recovers from the hidden states at
# K1 = 1, 2, 4, 8, 16 (no defence), then the defences at the default K1 = 2 (a secret rotation,
# noise of 0.1 and 1 × each state's RMS; secret input-layer weights, noise of 0.03, 0.1, 0.3 and
# 1 × each weight row's RMS; private fine-tunes from secret weights of 0.3 and 1). Prints the
# tables; charts go to benches/charts/.
# About 2.5 hours on two cores. Usage: recipes/audit.sh [extra hat audit flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
data=${HAT_ASSETS:-assets}/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json
./target/release/hat audit --dataset "$data" --input-layers 1,2,4,8,16 --defences none --plot benches/charts "$@"
echo
./target/release/hat audit --dataset "$data" --input-layers 2 --defences rotation,noise=0.1,noise=1 "$@"
echo
./target/release/hat audit --dataset "$data" --input-layers 2 --defences weights=0.03,weights=0.1,weights=0.3 "$@"
echo
./target/release/hat audit --dataset "$data" --input-layers 2 --defences weights=1,finetune=0.3,finetune=1 "$@"
