#!/usr/bin/env bash
# Float weights served (issue 28): the default model's bf16 safetensors directory (made into
# the test cache by `tests/safetensors.rs`; run that test first) under load, with its float
# matrices repacked for the FMA kernel (the default) and read as stored by the per-row dot
# kernels (`SLUICE_CPU_REPACK=0`, the float path before the repacking), and the default Q4_1
# GGUF beside them; arms in turns, each on a fresh server, so a round's arms share the
# machine's state.
#
#   scripts/bench_float_weights.sh [rounds]   (env: SLUICE_BIN, INPUT (158), OUTPUT (128))
#
# Prints per round, arm and concurrency (1 and 16): output tok/s, TTFT p50 and ITL p50.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
BIN=${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}
CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
DIR=$CACHE/test-models/smollm2-hf-bf16-v1
[ -d "$DIR" ] || { echo "missing $DIR: run cargo test --release --test integration safetensors::"; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run_arm() { # arm repack model
    (
        export SLUICE_BIN=$BIN SLUICE_CPU_REPACK=$2
        . scripts/serve_bg.sh --model "$3" --device cpu
        for c in 1 16; do
            "$BIN" bench serve --base-url "$SLUICE_URL" --model smol --concurrency "$c" \
                --num-requests $((c == 1 ? 8 : 48)) --warmup-requests 2 --workload random \
                --input-len "${INPUT:-158}" --output-len "${OUTPUT:-128}" --no-progress \
                --output "$OUT/$1-$c.json" >/dev/null
        done
    )
}
echo "round arm concurrency output_tok_s ttft_p50_ms itl_p50_ms"
for round in $(seq 1 "$ROUNDS"); do
    run_arm bf16-packed 1 "$DIR"
    run_arm bf16-raw 0 "$DIR"
    run_arm q4_1-gguf 1 "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    for arm in bf16-packed bf16-raw q4_1-gguf; do
        for c in 1 16; do
            python3 - "$OUT/$arm-$c.json" "$round $arm $c" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s = s.get("summary", s)
print(sys.argv[2], "%.1f" % s["output_throughput"], "%.0f" % s["ttft_ms"]["median"],
      "%.1f" % s["itl_ms"]["median"])
PY
        done
    done
done
