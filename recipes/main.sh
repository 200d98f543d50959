#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct), from a fresh clone:
# fetch the assets, build hat, and answer a prompt with the unsplit reference (`hat generate`).
# Usage: recipes/main.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prompt=${1:-"Explain in three sentences why the sky is blue."}
cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
./target/release/hat generate --prompt "$prompt" --max-tokens 200
