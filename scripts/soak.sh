#!/usr/bin/env bash
# Soak: mixed load against a real server for a while, then the verdict of
# `sluice bench soak` (no unexpected 5xx, no leaked KV block, RSS flat after warm-up).
#
#   scripts/soak.sh [DURATION] [extra `bench soak` flags]     (default 10m)
#
# With --faults the server is started with --enable-fault-injection (a binary built with the
# default features), so that the soak's injected faults fire.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10m}
shift || true
serve_flags=(--max-num-seqs 8 --max-waiting 16 --kv-cache-memory 134217728)
for a in "$@"; do
  [ "$a" = --faults ] && serve_flags+=(--enable-fault-injection)
done
. scripts/serve_bg.sh "${serve_flags[@]}"
"$SLUICE_BIN" bench soak --url "$SLUICE_URL" --pid "$SLUICE_PID" --duration "$DURATION" \
    --concurrency 8 "$@"
