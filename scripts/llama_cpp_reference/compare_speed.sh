#!/usr/bin/env bash
# Single-sequence speed, llama.cpp and sluice (both CPU numerics) side by side, alternated over
# three rounds on the same machine: llama.cpp's pp512/tg128 (refdump MODE=T, built by build.sh)
# and `sluice generate`'s prefill of a 510-token prompt and decode of 128 tokens.
# Usage: compare_speed.sh REFDUMP [SLUICE_BIN]
set -euo pipefail
refdump=${1:?usage: compare_speed.sh REFDUMP [SLUICE_BIN]}
bin=${2:-${CARGO_TARGET_DIR:-target}/release/sluice}
model=${SLUICE_MODEL:-$(python3 -c 'import os; print(os.path.join(os.environ.get("SLUICE_CACHE", os.path.expanduser("~/.cache/sluice")), "models/SmolLM2-135M-Instruct.Q4_1.gguf"))')}
prompt="$(python3 -c 'print(" ".join(["word"]*510))')"
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(round(d['$1'],1))"; }
for round in 1 2 3; do
  echo "round $round"
  MODE=T "$refdump" "$model" - - 2>/dev/null | tail -1 | sed 's/^/  llama.cpp  /'
  for n in fast ggml; do
    d=$("$bin" generate --prompt "The history of computing" --max-tokens 128 --ignore-eos --json \
        --cpu-numerics $n 2>/dev/null | field decode_tokens_per_s)
    p=$("$bin" generate --prompt "$prompt" --max-tokens 2 --json --cpu-numerics $n 2>/dev/null \
        | field prefill_tokens_per_s)
    echo "  sluice $n  prefill(510) $p tok/s  decode128 $d tok/s"
  done
done
