#!/usr/bin/env bash
# The batching issue's two figures on this machine, from one server run:
#  * aggregate decode throughput with 16 concurrent streams against one stream (short prompts,
#    long outputs, so decode dominates), as `sluice bench compare` ratios;
#  * the engine loop's own overhead at 16 streams: 1 - Σ forward / Σ step, from the server's
#    `sluice:engine_step_seconds` and `sluice:engine_forward_seconds` histograms.
# Usage: scripts/bench_batching.sh OUT_DIR   (uses an already built release binary)
set -euo pipefail
out=${1:-bench-results}
mkdir -p "$out"
bin=${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}
port=18124
# SLUICE_SERVE_ARGS: extra `sluice serve` flags (e.g. "--step-overlap worker-thread").
"$bin" serve --port $port --served-model-name smollm2 --kv-cache-memory 1073741824 ${SLUICE_SERVE_ARGS:-} > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "listening" "$out/serve.log" && break
  sleep 1
done
sums() {
  curl -s "http://127.0.0.1:$port/metrics" | awk '
    /^sluice:engine_step_seconds_sum/ {s=$2} /^sluice:engine_forward_seconds_sum/ {f=$2}
    END {print s, f}'
}
for c in 1 16; do
  read -r s0 f0 < <(sums)
  "$bin" bench serve --base-url http://127.0.0.1:$port --model smollm2 --workload random \
    --input-len 16 --output-len 256 --concurrency "$c" --num-requests "$c" \
    --warmup-requests "$c" --no-progress --label "decode-c$c" --output "$out/decode-c$c.json"
  read -r s1 f1 < <(sums)
  python3 -c "s=$s1-$s0; f=$f1-$f0; print(f'c=$c: step {s:.2f} s, forward {f:.2f} s, engine overhead {100*(s-f)/s:.2f}%')"
done
"$bin" bench compare "$out/decode-c1.json" "$out/decode-c16.json"
