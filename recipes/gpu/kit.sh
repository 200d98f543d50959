#!/usr/bin/env bash
# Makes the kit recipes/gpu/check.sh needs on a GPU machine without Rust or network:
# target/gpu-kit/ with two builds of `hat --features cuda` (recipes/build-cuda.sh), one linked
# against CUDA 13's runtime and cuBLAS, one against CUDA 12's (what PyTorch's cu12x wheels
# carry), each stripped and gzipped (76 MB → ~20 MB), and the default model's tokenizer files
# (from the default split). Carry the folder to the GPU machine and run recipes/gpu/check.sh
# there; it takes the build whose libraries that machine has.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/common.sh
kit=target/gpu-kit
mkdir -p "$kit"
for libs in 13 12; do
  HAT_CUDA_LIBS=$libs recipes/build-cuda.sh
  target=target-cuda; [ "$libs" = 13 ] || target=target-cuda$libs
  strip -o "$kit/hat-cu$libs" "$target/release/hat"
  gzip -f -6 "$kit/hat-cu$libs"
done
cp "$split/device/tokenizer.json" "$split/device/tokenizer_config.json" "$kit/"
du -sh "$kit"
