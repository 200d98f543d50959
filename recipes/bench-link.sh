#!/usr/bin/env bash
# HAT vs U-shape over emulated links (10/50/200 Mbit/s, 20 ms RTT), chunked prefill on a
# ~1000-token prompt, and how often f16/bf16 hidden states change a greedy token.
# Uses the shipped adapter for the default split if present (HAT_BENCH_ADAPTER to override).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
recipes/fetch-assets.sh >/dev/null
cargo bench --bench link 2>&1 | grep -v '^hat-cloud: session'
