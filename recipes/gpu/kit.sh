#!/usr/bin/env bash
# Makes the kit recipes/gpu/check.sh needs on a GPU machine without Rust or network:
# target/gpu-kit/ with `hat` built with `--features cuda` (recipes/build-cuda.sh; stripped and
# gzipped: 76 MB of kernels and code → ~20 MB) and the default model's tokenizer files (from the
# default split). Carry the folder to the GPU machine and run recipes/gpu/check.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
recipes/build-cuda.sh
source recipes/common.sh
kit=target/gpu-kit
mkdir -p "$kit"
strip -o "$kit/hat" target-cuda/release/hat
gzip -f -6 "$kit/hat"
cp "$split/device/tokenizer.json" "$split/device/tokenizer_config.json" "$kit/"
du -sh "$kit"
