#!/usr/bin/env bash
# Does the chunk planner choose well? `run-edge --chunk-size auto` against every fixed chunk size
# (0, 16, 32, 64, 128, 256, 512) for prompts of 128, 512, 1000 and 2000 tokens over 10/50/200
# Mbit/s at 20 ms and 50 Mbit/s at 80 ms, 5 repeats per cell, interleaved, medians; as two
# one-core machines (taskset), then on shared cores; then with the cloud busy serving another
# session. Profiles are measured first with `hat profile`. Here: ~1 hour for the two-machine grid
# (one repeat ~11 minutes), about as long again for shared cores.
# Settings (HAT_BENCH_REPEATS, _LENGTHS, _LINKS, _SIZES, _PLACEMENTS, _BUSY): benches/chunking.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
recipes/fetch-assets.sh >/dev/null
cargo bench --bench chunking 2>&1 | grep -v '^hat-cloud: session'
