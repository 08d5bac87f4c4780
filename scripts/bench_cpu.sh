#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md: `sluice generate` speed, then `sluice serve` under
# `sluice bench serve` at several concurrencies and with a shared-prefix workload.
# Usage: scripts/bench_cpu.sh OUT_DIR   (builds the release binary first)
set -euo pipefail
out=${1:-bench-results}
mkdir -p "$out"
cargo build --release
bin=${CARGO_TARGET_DIR:-target}/release/sluice

echo "== generate: decode (128 tokens) and prefill (512-token prompt), 3 runs each"
for i in 1 2 3; do
  "$bin" generate --prompt "The history of computing" --max-tokens 128 --ignore-eos --json 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print("decode", round(d["decode_tokens_per_s"],1))'
  "$bin" generate --prompt "$(python3 -c 'print(" ".join(["word"]*510))')" --max-tokens 2 --json 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print("prefill", len(d["prompt_ids"]), round(d["prefill_tokens_per_s"],1))'
done

echo "== serve + bench"
"$bin" serve --port 18123 --served-model-name smollm2 --kv-cache-memory 1073741824 > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "listening" "$out/serve.log" && break
  sleep 1
done
for c in 1 4 16 64; do
  n=$(( c < 8 ? 8 : c * 2 ))
  "$bin" bench serve --base-url http://127.0.0.1:18123 --model smollm2 --workload random \
    --input-len 128 --output-len 128 --concurrency "$c" --num-requests "$n" \
    --warmup-requests "$c" --no-progress --label "sluice-c$c" --output "$out/c$c.json"
done
"$bin" bench serve --base-url http://127.0.0.1:18123 --model smollm2 --workload prefix \
  --prefix-len 512 --input-len 64 --output-len 32 --concurrency 8 --num-requests 32 \
  --warmup-requests 8 --no-progress --label "sluice-prefix" --output "$out/prefix.json"
"$bin" bench compare "$out/c1.json" "$out/c4.json" "$out/c16.json" "$out/c64.json"
