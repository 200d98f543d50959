# Sourced by the benchmark recipes (from the repository root): builds the release binary,
# fetches the assets, makes the default split (K1 = K2 = 2) in $HAT_BENCH_SPLIT
# (default target/bench-split) if missing, and starts serve-cloud on loopback.
# Sets: hat (the binary), split (the split directory).
cargo build --release --quiet
recipes/fetch-assets.sh >/dev/null
hat=./target/release/hat
split=${HAT_BENCH_SPLIT:-target/bench-split}
[ -f "$split/device/manifest.json" ] || HAT_NO_PROGRESS=1 "$hat" split --out "$split" --force --input-layers 2 --output-layers 2 >/dev/null
# Paths the exit trap removes (a recipe adds its own).
cleanup=()

# start_cloud PORT LAUNCH [serve-cloud flags…]: `LAUNCH serve-cloud` for the split's cloud
# bundle on 127.0.0.1:PORT, where LAUNCH is what comes before the subcommand (e.g. "$hat", or
# "taskset -c 1 $hat --threads 1"); waits for it to listen. Sets cloud (its pid) and fp (its
# certificate's fingerprint); it is stopped, and the cleanup paths removed, on exit.
start_cloud() {
  local port=$1 launch=$2
  shift 2
  local state log
  state=$(mktemp -d)
  log=$(mktemp)
  cleanup+=("$state" "$log")
  # shellcheck disable=SC2086 # LAUNCH is split into words on purpose.
  $launch serve-cloud --bundle "$split/cloud" --listen "127.0.0.1:$port" --state-dir "$state" "$@" >"$log" 2>/dev/null &
  cloud=$!
  trap 'kill $cloud 2>/dev/null; rm -rf "${cleanup[@]}"' EXIT
  for _ in $(seq 600); do grep -q '^fingerprint' "$log" && break; sleep 0.1; done
  fp=$(sed -n 's/^fingerprint //p' "$log")
  [ -n "$fp" ] || { echo "serve-cloud did not start" >&2; exit 1; }
}
