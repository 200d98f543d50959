#!/usr/bin/env bash
# The cloud on a GPU, end to end (issue 16): run on a machine with an NVIDIA GPU, its driver,
# Python with numpy, and no network, from the repository root:
#     bash recipes/gpu/check.sh KIT
# KIT (made here by recipes/gpu/kit.sh; nothing in it is a model) holds `hat` built with
# `--features cuda` (recipes/build-cuda.sh) and the default model's tokenizer files. The check
#   1. writes a model of the default model's shapes with random weights (recipes/gpu/random_model.py)
#      and splits it (K1 = K2 = 2, f32);
#   2. greedy equality: for each prompt, `hat generate` on the CPU against `run-edge` (CPU, f32
#      on the wire) with `serve-cloud --device cuda --dtype f32`, u-shape and hat;
#   3. `hat loadgen` for N = 1 … 32 sessions against the GPU cloud in f32 and in bf16, one-row
#      and five-row blocks, and N = 16 with --no-batching.
# Writes gpu-check.md (and the raw JSON) to $OUT (default target/gpu-check).
# A dry run of the script on a machine without a GPU: HAT_GPU_CHECK_DEVICE=cpu
# HAT_GPU_CHECK_SECONDS=2 (both clouds then on the CPU).
set -euo pipefail
device=${HAT_GPU_CHECK_DEVICE:-cuda}
secs=${HAT_GPU_CHECK_SECONDS:-8}
kit=${1:?usage: recipes/gpu/check.sh KIT}
out=${OUT:-target/gpu-check}
mkdir -p "$out"
work=$(mktemp -d)
# The CUDA libraries hat links (the CUDA runtime, cuBLAS, cuRAND; libcuda from the driver):
# wherever Python's NVIDIA wheels (PyTorch's) or a toolkit put them.
libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for f in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs:+$libs:}/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The kit's builds (linked against CUDA 13's libraries, then CUDA 12's): the first whose
# libraries this machine has.
hat=""
for gz in "$kit"/hat-cu13.gz "$kit"/hat-cu12.gz "$kit"/hat.gz; do
  [ -f "$gz" ] || continue
  gunzip -c "$gz" >"$work/hat"
  chmod +x "$work/hat"
  if [ "$device" != cuda ] || ! ldd "$work/hat" | grep -q 'not found'; then hat=$work/hat; echo "using $(basename "$gz")"; break; fi
  echo "$(basename "$gz") needs libraries this machine lacks:" >&2
  ldd "$work/hat" | grep 'not found' >&2
done
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
[ -n "$hat" ] || { echo "no build in $kit can run here" >&2; exit 1; }
report="$out/gpu-check.md"
: >"$report"
note() { echo "$*" | tee -a "$report"; }

note "# GPU check, $(date -u +%F)"
note
note '```'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$report" || true
note '```'
python3 recipes/gpu/random_model.py --tokenizer-dir "$kit" --out "$work/model" >/dev/null
HAT_NO_PROGRESS=1 "$hat" split --model "$work/model" --out "$work/split" --dtype f32 >/dev/null 2>&1

# start_cloud PORT FLAGS…: a GPU cloud on 127.0.0.1:PORT; sets fp.
start_cloud() {
  local port=$1
  shift
  local log="$work/cloud-$port.log"
  "$hat" serve-cloud --bundle "$work/split/cloud" --listen "127.0.0.1:$port" --state-dir "$work/state-$port" \
    --device "$device" --max-sessions 40 "$@" >"$log" 2>"$log.err" &
  pids+=($!)
  for _ in $(seq 1200); do grep -q '^fingerprint' "$log" && break; sleep 0.1; done
  fp=$(sed -n 's/^fingerprint //p' "$log")
  if [ -z "$fp" ]; then
    note "serve-cloud --device $device $* did not start:"
    note '```'
    tail -20 "$log.err" | tee -a "$report"
    note '```'
    exit 1
  fi
  grep 'serving split' "$log.err" | tee -a "$report" || true
}

note
note "## Greedy equality: hat generate (CPU, f32) against run-edge with the cloud on the GPU in f32"
note
start_cloud 4501 --dtype f32
prompts=("Write a short poem about the sea." "List three prime numbers and explain why they are prime."
  "def fibonacci(n):" "Why is the sky blue? Answer in two sentences.")
note "| prompt | mode | identical tokens | of |"
note "|---|---|---|---|"
for p in "${prompts[@]}"; do
  "$hat" generate --model "$work/model" --prompt "$p" --max-tokens 32 --json 2>/dev/null >"$work/want.json"
  for mode in u-shape hat; do
    "$hat" run-edge --bundle "$work/split/device" --cloud 127.0.0.1:4501 --cloud-fingerprint "$fp" \
      --prompt "$p" --max-tokens 32 --mode "$mode" --adapter none --wire-dtype f32 --json 2>"$work/edge.err" >"$work/got.json" ||
      { note "run-edge failed:"; tail -5 "$work/edge.err" | tee -a "$report"; exit 1; }
    python3 - "$work/want.json" "$work/got.json" "$p" "$mode" <<'PY' | tee -a "$report"
import json, sys
want = json.load(open(sys.argv[1]))["token_ids"]
got = json.load(open(sys.argv[2]))["token_ids"]
same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
print(f"| {sys.argv[3][:30]} | {sys.argv[4]} | {same} | {len(want)} |")
PY
  done
done

# loadgen_table PORT LABEL FLAGS…: positions/s, × one session, p50/p99 for N = 1 … 32.
loadgen_table() {
  local port=$1 label=$2
  shift 2
  local ns=(1 2 4 8 16 32)
  local row="| $label |" times="| × one session |" p99="| round p99 ms |"
  local one=""
  for n in "${ns[@]}"; do
    "$hat" loadgen --bundle "$work/split/device" --cloud "127.0.0.1:$port" --cloud-fingerprint "$fp" \
      --sessions "$n" --duration "$secs" --json "$@" 2>/dev/null >"$out/loadgen-$port-$label-$n.json" || { row+=" failed |"; continue; }
    read -r pps p <<<"$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(d['positions_per_s'],1), round(d['round_ms_p99'],1))" "$out/loadgen-$port-$label-$n.json")"
    [ -n "$one" ] || one=$pps
    row+=" $pps |"
    times+=" $(python3 -c "print(round($pps / $one, 2))") |"
    p99+=" $p |"
  done
  note "$row"
  note "$times"
  note "$p99"
}

note
note "## hat loadgen against the GPU cloud (positions/s; closed loop, loopback)"
note
note "| | N = 1 | 2 | 4 | 8 | 16 | 32 |"
note "|---|---|---|---|---|---|---|"
loadgen_table 4501 "f32, 1-row blocks" --block-rows 1 --advance 1
loadgen_table 4501 "f32, 5-row blocks" --block-rows 5 --advance 2
start_cloud 4502 --dtype bf16
loadgen_table 4502 "bf16, 1-row blocks" --block-rows 1 --advance 1
loadgen_table 4502 "bf16, 5-row blocks" --block-rows 5 --advance 2
start_cloud 4503 --dtype bf16 --no-batching
"$hat" loadgen --bundle "$work/split/device" --cloud 127.0.0.1:4503 --cloud-fingerprint "$fp" --sessions 16 \
  --duration "$secs" --json --block-rows 1 --advance 1 2>/dev/null >"$out/loadgen-nobatch-16.json" &&
  note "bf16, --no-batching, 16 sessions, 1-row: $(python3 -c "import json; print(round(json.load(open('$out/loadgen-nobatch-16.json'))['positions_per_s'],1))") positions/s"
note
note "GPU memory in use with all three clouds up (their sessions closed):"
note '```'
nvidia-smi --query-gpu=memory.used,memory.total --format=csv 2>&1 | tee -a "$report" || true
note '```'
echo "report: $report"
