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
python3 - "$LINES" > "$DATA/in.jsonl" <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"prompt": f"Item {i}: a short note about the number {i}.",
                               "max_tokens": 32, "ignore_eos": True}}))
PY
FILE=$(curl -sf "$SLUICE_URL/v1/files" -F purpose=batch -F file=@"$DATA/in.jsonl" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
files=()
for r in $(seq 1 "$ROUNDS"); do
    bench "alone-$r"; files+=("$OUT/alone-$r.json")
    BATCH=$(curl -sf "$SLUICE_URL/v1/batches" -H 'content-type: application/json' \
        -d "{\"input_file_id\": \"$FILE\", \"endpoint\": \"/v1/completions\", \"completion_window\": \"24h\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    sleep 2
    bench "with-batch-$r"; files+=("$OUT/with-batch-$r.json")
    curl -sf "$SLUICE_URL/v1/batches/$BATCH" | python3 -c \
        'import json,sys; b=json.load(sys.stdin); print(b["id"], b["status"], b["request_counts"])'
    curl -sf -X POST "$SLUICE_URL/v1/batches/$BATCH/cancel" > /dev/null
    sleep 2
done
"$BIN" bench compare "${files[@]}"
