#!/usr/bin/env bash
# Online TTFT with and without a batch running (issue 20): 8 concurrent streams, alone and
# while an N-line batch (lowest priority, --max-batch-concurrency at once) runs on the same
# server; the arms alternate. Usage: scripts/bench_batch.sh [LINES] [ROUNDS] [extra serve flags]
# (CONCURRENCY=8 and INPUT_LEN=128 in the environment shape the online load).
# Prints `sluice bench compare` of the arms and whether the batch finished. Each arm has its own
# prompts (its own --seed): with the same prompts, every arm after the first would find them in
# the prefix cache and measure no prefill at all.
set -euo pipefail
LINES=${1:-2000}
ROUNDS=${2:-2}
shift 2 || true
OUT=${OUT:-target/bench-batch}
mkdir -p "$OUT"
DATA=$(mktemp -d)
source "$(dirname "$0")/serve_bg.sh" --data-dir "$DATA" "$@"
trap 'kill $SLUICE_PID 2>/dev/null; rm -rf "$DATA" "$SERVE_LOG"' EXIT
BIN=${SLUICE_BIN:-target/release/sluice}
SEED=0
bench() {
    SEED=$((SEED + 1))
    "$BIN" bench serve --seed "$SEED" --base-url "$SLUICE_URL" --model smol --workload random \
        --input-len "${INPUT_LEN:-128}" --output-len 32 --concurrency "${CONCURRENCY:-8}" --num-requests 48 \
        --warmup-requests 4 --no-progress --label "$1" --output "$OUT/$1.json" > /dev/null
}
source "$(dirname "$0")/batch_input.sh"
upload_batch_input "$LINES"
files=()
for r in $(seq 1 "$ROUNDS"); do
    bench "alone-$r"; files+=("$OUT/alone-$r.json")
    start_batch
    sleep 2
    bench "with-batch-$r"; files+=("$OUT/with-batch-$r.json")
    batch_field 'b["id"], b["status"], b["request_counts"]'
    curl -sf -X POST "$SLUICE_URL/v1/batches/$BATCH/cancel" > /dev/null
    sleep 2
done
"$BIN" bench compare "${files[@]}"
