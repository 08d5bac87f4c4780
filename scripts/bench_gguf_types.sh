#!/usr/bin/env bash
# GGUF block types side by side (issue 28): the default model (Q4_1), the files
# `tests/gguf_types.rs` makes from it into the test cache (every quantized matrix in Q5_0, in
# Q5_1, in IQ4_NL; ffn_down in Q3_K, Q4_K, Q5_K, Q6_K; run that test first) and, when
# `scripts/llama_cpp_reference/kquant_files.sh` has made them, llama-quantize's own Q4_K_M and
# Q5_K_M files of it, decoded by `sluice generate` in turns, so each round's arms share the
# machine's state.
#
#   scripts/bench_gguf_types.sh [rounds]   (env: SLUICE_BIN, TOKENS (default 256), ARMS)
#
# Prints per round and file: decode tok/s (one stream) and its ratio to Q4_1's in that round.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=${SLUICE_BIN:-target/release/sluice}
CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
T=$CACHE/test-models
declare -A FILES=(
    [Q4_1]=$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [Q5_0]=$T/smollm2-q5_0-v1.gguf
    [Q5_1]=$T/smollm2-q5_1-v1.gguf
    [IQ4_NL]=$T/smollm2-iq4_nl-v1.gguf
    [Q3_K]=$T/smollm2-q3_k-v1.gguf
    [Q4_K]=$T/smollm2-q4_k-v1.gguf
    [Q5_K]=$T/smollm2-q5_k-v1.gguf
    [Q6_K]=$T/smollm2-q6_k-v1.gguf
    [Q4_K_M]=$T/llama-quantize/smollm2-Q4_K_M.gguf
    [Q5_K_M]=$T/llama-quantize/smollm2-Q5_K_M.gguf
)
read -r -a ARMS <<< "${ARMS:-Q4_1 Q5_0 Q5_1 IQ4_NL Q3_K Q4_K Q5_K Q6_K Q4_K_M Q5_K_M}"
for t in "${ARMS[@]}"; do
    [ -f "${FILES[$t]}" ] || { echo "missing ${FILES[$t]}: run cargo test --release --test integration gguf_types:: (and scripts/llama_cpp_reference/kquant_files.sh for *_K_M)"; exit 1; }
done
echo "round type decode_tok_s vs_q4_1"
for round in $(seq 1 "$ROUNDS"); do
    declare -A rate=()
    for t in "${ARMS[@]}"; do
        rate[$t]=$("$BIN" generate --model "${FILES[$t]}" --prompt "Once upon a time" \
            --max-tokens "${TOKENS:-256}" --ignore-eos --json --threads 2 2>/dev/null |
            tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])')
    done
    for t in "${ARMS[@]}"; do
        python3 -c "print('$round $t %.1f %.2f' % (${rate[$t]}, ${rate[$t]} / ${rate[Q4_1]}))"
    done
done
