#!/usr/bin/env bash
# Engine benchmark: hat vs candle-transformers' quantized_llama (dequantized f32) on the default
# GGUF; prints a markdown table of median prefill and decode tokens/s.
# Environment: HAT_BENCH_REPEATS (default 5), HAT_BENCH_PROMPT_TOKENS (200), HAT_BENCH_DECODE_TOKENS (64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

recipes/fetch-assets.sh >/dev/null
cargo bench --bench engine
