#!/usr/bin/env bash
# Builds hat with candle's CUDA backend (`--features cuda`) into target-cuda/, without a
# system CUDA toolkit: NVIDIA's PyPI wheels of CUDA 13.0 (nvcc, NVVM, the runtime headers,
# CCCL, and the cuBLAS, cuRAND and NVRTC libraries the binary links) go into the git-ignored
# .venv-cuda/, with a link-time stub of the driver's libcuda (the real one comes with the
# driver). No GPU is needed to build; running needs an NVIDIA driver for CUDA 13.0 or later and
# the CUDA 13 runtime, cuBLAS and cuRAND libraries (LD_LIBRARY_PATH; e.g. PyTorch's wheels).
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are compiled for (default 90: H100/H200).
# Then: `target-cuda/release/hat serve-cloud --device cuda …`; recipes/gpu/ checks it on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-cuda
cuda=13.0
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==$cuda.*" "nvidia-nvvm==$cuda.*" "nvidia-cuda-runtime==$cuda.*" \
  "nvidia-cuda-cccl==$cuda.*" "nvidia-cuda-crt==$cuda.*" "nvidia-cuda-nvrtc==$cuda.*" "nvidia-cublas==$cuda.*" \
  "nvidia-curand==10.4.0.*"
root=$(cd "$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)" && pwd)
"$root/bin/nvcc" --version | tail -1
# The linker wants unversioned names.
for so in "$root"/lib/lib{cudart,cublas,cublasLt,nvrtc}.so.13 "$root"/lib/libcurand.so.10; do
  ln -sf "$(basename "$so")" "${so%.so.*}.so"
done
# libcuda comes with the driver; link against a stub of the driver API cudarc binds (its soname
# is libcuda.so.1, so at run time the driver's library is the one loaded).
cargo fetch --quiet
bindings=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
[ -n "$bindings" ] || { echo "cudarc's sources not found under \$CARGO_HOME/registry" >&2; exit 1; }
stub=$(mktemp -d)
grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$bindings" | sed -E 's/^\s+fn //; s/\($//' | sort -u |
  awk '{print "void " $1 "(void) {}"}' >"$stub/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$stub/libcuda.c"
rm -rf "$stub"
CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  cargo build --release --features cuda --target-dir target-cuda --bin hat
ls -l target-cuda/release/hat
