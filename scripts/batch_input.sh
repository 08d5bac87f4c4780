# Sourced by the batch benchmarks: uploads an N-line completions batch file (32 tokens a line,
# each line its own prompt) to $SLUICE_URL and sets FILE to its id; `start_batch` submits it
# and sets BATCH; `batch_field EXPR` prints a Python expression of the batch object `b`.
upload_batch_input() {
    python3 - "$1" > "$DATA/in.jsonl" <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"prompt": f"Item {i}: a short note about the number {i}.",
                               "max_tokens": 32, "ignore_eos": True}}))
PY
    FILE=$(curl -sf "$SLUICE_URL/v1/files" -F purpose=batch -F file=@"$DATA/in.jsonl" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
}
start_batch() {
    BATCH=$(curl -sf "$SLUICE_URL/v1/batches" -H 'content-type: application/json' \
        -d "{\"input_file_id\": \"$FILE\", \"endpoint\": \"/v1/completions\", \"completion_window\": \"24h\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
}
batch_field() {
    curl -sf "$SLUICE_URL/v1/batches/$BATCH" |
        python3 -c "import json,sys; b=json.load(sys.stdin); print($1)"
}
