#!/usr/bin/env bash
# Speculative decoding (issue 25), both arms in one run on one server: the server runs with
# --speculative-config, and each arm's requests say `"speculative": false` or `true`, so the
# arms share the process, the machine's state and the hour; they alternate per workload and
# concurrency. Prefix caching is off, so neither arm finds the other's prompts cached.
#
#   scripts/bench_speculative.sh [rounds]   (env: OUT, SPEC_CONFIG, SLUICE_BIN, N1, N16, PROMPTS)
#
# Workloads (scripts/speculative_workloads.py, from this repository's files): `grounded`
# (edit given code, quote a given text, extract JSON from a document) and `free` (a story
# from a one-line prompt); greedy, stopping at EOS. Prints one line per (round, workload,
# concurrency): output tok/s without and with speculation and their ratio. With
# SPEC_CONFIG='{"method":"suffix"}' and few PROMPTS (default 24), requests repeat ones the
# server answered before (either arm's): the traffic of retries and agent loops.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
OUT=${OUT:-/tmp/bench_speculative}
SPEC_CONFIG=${SPEC_CONFIG:-'{"method":"ngram"}'}
N1=${N1:-8}
N16=${N16:-32}
mkdir -p "$OUT"
python3 scripts/speculative_workloads.py "$OUT" "${PROMPTS:-24}" >/dev/null
. scripts/serve_bg.sh --no-prefix-cache --speculative-config "$SPEC_CONFIG"
for _ in $(seq 1 300); do
    curl -sf "$SLUICE_URL/health/ready" >/dev/null && break
    sleep 0.2
done
bench() { # workload concurrency arm round
    local n=$N1
    [ "$2" -gt 1 ] && n=$N16
    "$SLUICE_BIN" bench serve --base-url "$SLUICE_URL" --model smol --endpoint chat \
        --workload jsonl --dataset "$OUT/$1.jsonl" --allow-eos --concurrency "$2" \
        --num-requests "$n" --warmup-requests 1 --no-progress \
        --extra-body "{\"temperature\":0,\"speculative\":$3}" \
        --label "$1-c$2-$3" --output "$OUT/$4-$1-c$2-$3.json" >/dev/null
}
echo "round workload concurrency off_tok_s on_tok_s ratio"
for round in $(seq 1 "$ROUNDS"); do
    for workload in grounded free; do
        for c in 1 16; do
            bench "$workload" "$c" false "$round"
            bench "$workload" "$c" true "$round"
            python3 - "$OUT/$round-$workload-c$c" "$round $workload $c" <<'PY'
import json, sys
off, on = (json.load(open(f"{sys.argv[1]}-{a}.json"))["summary"] for a in ("false", "true"))
a, b = off["output_throughput"], on["output_throughput"]
print(f"{sys.argv[2]} {a:.1f} {b:.1f} {b / a:.2f}")
PY
        done
    done
done
curl -s "$SLUICE_URL/metrics" | grep '^vllm:spec_decode' | sed 's/{[^}]*}//' > "$OUT/spec_metrics.txt"
cat "$OUT/spec_metrics.txt"
