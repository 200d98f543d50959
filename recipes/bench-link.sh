#!/usr/bin/env bash
# HAT vs U-shape over emulated links (10/50/200 Mbit/s at 20 ms RTT, 50 Mbit/s at 80 ms), with
# serve-cloud and run-edge as two processes: first as two one-core machines (taskset), then on
# shared cores; the 16 prompts of benches/prompts.json; then how often f16/bf16 hidden states
# change a greedy token. ~30 minutes here. (Prefill chunking: recipes/bench-chunking.sh.)
# Settings (HAT_BENCH_TABLES, _PROMPTS, _LINKS, _CONFIGS, _ADAPTER, _TOKENS): benches/link.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
recipes/fetch-assets.sh >/dev/null
cargo bench --bench link 2>&1 | grep -v '^hat-cloud: session'
