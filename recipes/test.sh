#!/usr/bin/env bash
# The test suite, from a fresh clone: fetch the assets the integration tests use, then run every
# test in release mode (models run in tests; candle in a debug build is tens of times slower).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
cargo test --release "$@"
