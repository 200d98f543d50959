#!/usr/bin/env bash
# Builds hat with candle's CUDA backend (`--features cuda`) into target-cuda/, without a
# system CUDA toolkit: NVIDIA's PyPI wheels (nvcc, the runtime headers, CCCL, NVVM of CUDA
# 13.0) go into the git-ignored .venv-cuda/. No GPU is needed to build; running needs an NVIDIA
# driver for CUDA 13.0 or later (libcuda is loaded at run time). CUDA_COMPUTE_CAP picks the GPU
# generation the kernels are compiled for (default 90: H100/H200).
# Then: `target-cuda/release/hat serve-cloud --device cuda …`; recipes/gpu/check.sh runs the
# end-to-end check on a machine with a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-cuda
cuda=13.0
if [ ! -x "$venv/bin/pip" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==$cuda.*" "nvidia-cuda-runtime==$cuda.*" \
  "nvidia-cuda-cccl==$cuda.*" "nvidia-cuda-crt==$cuda.*" "nvidia-nvvm==$cuda.*"
root=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
root=$(cd "$root" && pwd)
"$root/bin/nvcc" --version | tail -1
CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  cargo build --release --features cuda --target-dir target-cuda --bin hat
ls -l target-cuda/release/hat
