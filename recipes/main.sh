#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct), from a fresh clone: fetch the model,
# split it, start `hat serve-cloud` on loopback, answer a prompt with `hat run-edge` (HAT:
# speculative decoding over hidden states), print TTFT, TBT and acceptance, stop the server.
# Usage: recipes/main.sh ["your prompt"]   (extra run-edge flags via HAT_EDGE_FLAGS)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prompt=${1:-"Explain in three sentences why the sky is blue."}
cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
hat=./target/release/hat
runs=${HAT_RUNS:-runs}
split=$runs/split-default
mkdir -p "$runs"

if [ ! -f "$split/cloud/manifest.json" ] || [ ! -f "$split/device/manifest.json" ]; then
  HAT_NO_PROGRESS=1 "$hat" split --out "$split" --force --input-layers 2 --output-layers 2
fi

log=$runs/serve-cloud.log
"$hat" serve-cloud --bundle "$split/cloud" --listen 127.0.0.1:0 --state-dir "$runs/cloud-state" >"$log" 2>"$runs/serve-cloud.err" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  grep -q '^fingerprint ' "$log" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$runs/serve-cloud.err" >&2; exit 1; }
  sleep 0.1
done
addr=$(awk '/^listening /{print $2}' "$log")
fingerprint=$(awk '/^fingerprint /{print $2}' "$log")
[ -n "$fingerprint" ] || { echo "main: serve-cloud did not start" >&2; cat "$runs/serve-cloud.err" >&2; exit 1; }

# shellcheck disable=SC2086
"$hat" run-edge --bundle "$split/device" --cloud "$addr" --cloud-fingerprint "$fingerprint" \
  --prompt "$prompt" --max-tokens 200 ${HAT_EDGE_FLAGS:-}
