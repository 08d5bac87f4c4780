#!/usr/bin/env bash
# A batch finishing beside online traffic below capacity (issue 20): an open-loop online load
# (RATE requests/s, at most 8 in flight, random INPUT_LEN in / 32 out) alone for ARM_S seconds, then in ARM_S arms
# while an N-line batch (32 tokens a line, lowest priority) runs, until the batch is done, then
# alone again. Prints the batch's wall time and `sluice bench compare` of every arm.
# Usage: scripts/bench_batch_finish.sh [LINES] [extra serve flags]
set -euo pipefail
LINES=${1:-2000}
shift || true
RATE=${RATE:-1}
ARM_S=${ARM_S:-60}
OUT=${OUT:-target/bench-batch-finish}
mkdir -p "$OUT"
DATA=$(mktemp -d)
source "$(dirname "$0")/serve_bg.sh" --data-dir "$DATA" "$@"
trap 'kill $SLUICE_PID 2>/dev/null; rm -rf "$DATA" "$SERVE_LOG"' EXIT
BIN=${SLUICE_BIN:-target/release/sluice}
SEED=0
files=()
online() {
    SEED=$((SEED + 1))
    "$BIN" bench serve --seed "$SEED" --base-url "$SLUICE_URL" --model smol --workload random \
        --input-len "${INPUT_LEN:-128}" --output-len 32 --request-rate "$RATE" --concurrency 8 \
        --duration "$ARM_S" --warmup-requests 0 --no-progress --label "$1" \
        --output "$OUT/$1.json" > /dev/null
    files+=("$OUT/$1.json")
}
source "$(dirname "$0")/batch_input.sh"
upload_batch_input "$LINES"
online alone-before
start_batch
START=$(date +%s.%N)
ARM=0
while true; do
    STATUS=$(batch_field 'b["status"]')
    [ "$STATUS" = completed ] && break
    case "$STATUS" in failed | expired | cancelled) echo "the batch ended $STATUS"; exit 1 ;; esac
    ARM=$((ARM + 1))
    online "with-batch-$ARM"
    echo "after arm $ARM: $(batch_field 'b["status"], b["request_counts"]')"
    [ "$ARM" -lt 60 ] || { echo "the batch did not finish in 60 arms"; exit 1; }
done
echo "batch of $LINES lines: $(batch_field 'b["status"], b["request_counts"], b["completed_at"] - b["in_progress_at"]') s from in_progress to completed"
echo "script wall time from submission to the arm that saw it done: $(python3 -c "print(round($(date +%s.%N) - $START, 1))") s"
online alone-after
"$BIN" bench compare "${files[@]}"
