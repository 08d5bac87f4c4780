# Sourced by the scripts here: starts `$SLUICE_BIN serve` (default target/release/sluice) on a
# free port with "$@" as extra flags, waits for its address, sets SLUICE_URL and SLUICE_PID,
# and kills it on exit.
SLUICE_BIN=${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}
SERVE_LOG=$(mktemp)
"$SLUICE_BIN" serve --host 127.0.0.1 --port 0 --threads 2 --served-model-name smol "$@" \
    > "$SERVE_LOG" 2>&1 &
SLUICE_PID=$!
trap 'kill $SLUICE_PID 2>/dev/null; rm -f "$SERVE_LOG"' EXIT
for _ in $(seq 1 600); do
    SLUICE_URL=$(sed -n 's/^sluice listening on //p' "$SERVE_LOG")
    [ -n "$SLUICE_URL" ] && break
    kill -0 $SLUICE_PID 2>/dev/null || { cat "$SERVE_LOG"; exit 1; }
    sleep 0.2
done
[ -n "$SLUICE_URL" ] || { echo "the server did not start"; cat "$SERVE_LOG"; exit 1; }
export SLUICE_URL SLUICE_PID
