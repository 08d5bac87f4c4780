#!/usr/bin/env bash
# Soak: mixed load against a real server for a while, then the verdict of
# `sluice bench soak` (no unexpected 5xx, no leaked KV block, RSS flat after warm-up).
#
#   scripts/soak.sh [DURATION] [extra `bench soak` flags]     (default 10m)
#
# Pass --faults only with a test build of the binary (SLUICE_BIN=<the binary `cargo test`
# built>), which has the fault-injection hooks.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10m}
shift || true
. scripts/serve_bg.sh --max-num-seqs 8 --max-waiting 16 --kv-cache-memory 134217728
"$SLUICE_BIN" bench soak --url "$SLUICE_URL" --pid "$SLUICE_PID" --duration "$DURATION" \
    --concurrency 8 "$@"
