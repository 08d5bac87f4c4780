#!/usr/bin/env bash
# Quantization at load (issue 28): the default model's bf16 safetensors directory (made into
# the test cache by `tests/safetensors.rs`; run that test first) decoded by `sluice generate`
# as stored (bf16 weights, the float kernels) and with `--quantization q8_0` and `q4_0`, in
# turns, so each round's arms share the machine's state; and the load-time quantization's
# own time, from its log line.
#
#   scripts/bench_quantization.sh [rounds]   (env: SLUICE_BIN, TOKENS (default 256))
#
# Prints per round and arm: decode tok/s (one stream), its ratio to bf16's in that round, and
# the seconds spent quantizing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=${SLUICE_BIN:-target/release/sluice}
CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
DIR=$CACHE/test-models/smollm2-hf-bf16-v1
[ -d "$DIR" ] || { echo "missing $DIR: run cargo test --release --test integration safetensors::"; exit 1; }
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
echo "round arm decode_tok_s vs_bf16 quantize_s"
for round in $(seq 1 "$ROUNDS"); do
    base=
    for arm in bf16 q8_0 q4_0; do
        flag=()
        [ "$arm" != bf16 ] && flag=(--quantization "$arm")
        rate=$(RUST_LOG=info "$BIN" generate --model "$DIR" "${flag[@]}" --prompt "Once upon a time" \
            --max-tokens "${TOKENS:-256}" --ignore-eos --json --threads 2 2>"$LOG" |
            tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])')
        secs=$(sed -n 's/.*quantized .* in \([0-9.]*\) s.*/\1/p' "$LOG" | head -1)
        base=${base:-$rate}
        python3 -c "print('$round $arm %.1f %.2f ${secs:--}' % ($rate, $rate / $base))"
    done
done
