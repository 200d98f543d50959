#!/usr/bin/env bash
# Builds hat with candle's CUDA backend (`--features cuda`) without a system CUDA toolkit:
# NVIDIA's PyPI wheels of CUDA 13.0 (nvcc, NVVM, headers, CCCL) go into the git-ignored
# .venv-cuda/, and the binary links against the CUDA runtime, cuBLAS and cuRAND of
#   HAT_CUDA_LIBS=13 (default): CUDA 13 (libcudart.so.13, libcublas.so.13) → target-cuda/
#   HAT_CUDA_LIBS=12: CUDA 12 (libcudart.so.12, libcublas.so.12, as PyTorch's cu12x wheels
#                     carry them) → target-cuda12/
# and a link-time stub of the driver's libcuda (the real one comes with the driver). No GPU is
# needed to build. Running needs those libraries (LD_LIBRARY_PATH) and, either way, an NVIDIA
# driver for CUDA 13.0 or later (r580+: the kernels are PTX from nvcc 13.0). CUDA_COMPUTE_CAP
# picks the GPU generation the kernels are compiled for (default 90: H100/H200).
# Then: `target-cuda/release/hat serve-cloud --device cuda …`; recipes/gpu/ checks it on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
libs=${HAT_CUDA_LIBS:-13}
venv=.venv-cuda
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*"
toolkit=$(cd "$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)" && pwd)
"$toolkit/bin/nvcc" --version | tail -1
# A toolkit-shaped folder for the build: nvcc and headers of 13.0, the libraries of $libs.
root=$PWD/$venv/root-cuda$libs
mkdir -p "$root/lib"
for d in bin include nvvm; do ln -sfn "$toolkit/$d" "$root/$d"; done
case $libs in
  13)
    "$venv/bin/pip" install --quiet "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
    sos=("$toolkit"/lib/lib{cudart,cublas,cublasLt,nvrtc}.so.13 "$toolkit"/lib/libcurand.so.10)
    target=target-cuda version=13000 ;;
  12)
    "$venv/bin/pip" install --quiet "nvidia-cuda-runtime-cu12==12.8.*" "nvidia-cublas-cu12==12.8.*" \
      "nvidia-curand-cu12==10.3.9.*" "nvidia-cuda-nvrtc-cu12==12.8.*"
    site=$(echo "$venv"/lib/python3*/site-packages/nvidia)
    sos=("$site"/cuda_runtime/lib/libcudart.so.12 "$site"/cublas/lib/libcublas{,Lt}.so.12 \
      "$site"/cuda_nvrtc/lib/libnvrtc.so.12 "$site"/curand/lib/libcurand.so.10)
    target=target-cuda12 version=12080 ;;
  *) echo "HAT_CUDA_LIBS must be 13 or 12" >&2; exit 1 ;;
esac
# The linker wants unversioned names.
for so in "${sos[@]}"; do
  so=$(cd "$(dirname "$so")" && pwd)/$(basename "$so")
  ln -sf "$so" "$root/lib/$(basename "${so%.so.*}").so"
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
  CUDARC_CUDA_VERSION=$version cargo build --release --features cuda --target-dir "$target" --bin hat
ls -l "$target/release/hat"
