#!/usr/bin/env bash
# Property-based API testing: schemathesis generates requests (valid and not) from the
# server's own /openapi.json and checks that none yields a 5xx.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]        (default 50 per operation)
#
# Uses $SLUICE_BIN (default target/release/sluice) and a virtual environment with
# schemathesis under ~/.cache/sluice/schemathesis-venv (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXAMPLES=${1:-50}
VENV=${SLUICE_CACHE:-$HOME/.cache/sluice}/schemathesis-venv
if [ ! -x "$VENV/bin/st" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi
# A short context keeps generated requests cheap; any max_tokens is still accepted or
# refused with a 400.
# With a data directory, so the Files, Batch and async endpoints are exercised too.
DATA=$(mktemp -d)
. scripts/serve_bg.sh --max-model-len 64 --max-num-seqs 8 --max-waiting 64 --data-dir "$DATA"
trap 'kill $SLUICE_PID 2>/dev/null; rm -rf "$SERVE_LOG" "$DATA"' EXIT
# schemathesis keeps its example database in the working directory: run it in the cache dir,
# never in the clone.
mkdir -p "$VENV/work"
(cd "$VENV/work" && "$VENV/bin/st" run "$SLUICE_URL/openapi.json" --url "$SLUICE_URL" \
    --checks not_a_server_error --max-examples "$MAX_EXAMPLES" \
    --phases examples,coverage,fuzzing --no-color --seed 1)
