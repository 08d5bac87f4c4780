#!/usr/bin/env bash
# Two arms of one release binary that differ only in environment variables (e.g. a kernel
# switch such as SLUICE_CPU_REPACK=0), alternated over ROUNDS rounds on this machine: per arm
# and round, `sluice generate`'s prefill of a 510-token prompt and decode of 128 tokens, then
# `sluice serve` under 16 concurrent streams of random 128-token prompts and 128 tokens out.
# Usage: scripts/bench_env_ab.sh OUT_DIR "ENV_A" "ENV_B"   e.g. "SLUICE_CPU_REPACK=0" ""
# (the release binary must be built; ROUNDS, default 2; STREAMS, default 16).
set -euo pipefail
out=${1:?usage: bench_env_ab.sh OUT_DIR ENV_A ENV_B}
arms=("${2-}" "${3-}")
rounds=${ROUNDS:-2}
streams=${STREAMS:-16}
bin=${CARGO_TARGET_DIR:-target}/release/sluice
mkdir -p "$out"
prompt="$(python3 -c 'print(" ".join(["word"]*510))')"
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(round(d['$1'],1))"; }
port=18140
for round in $(seq 1 "$rounds"); do
  for a in 0 1; do
    envs=${arms[$a]}
    label="arm$a-r$round"
    p=$(env $envs "$bin" generate --prompt "$prompt" --max-tokens 2 --json 2>/dev/null | field prefill_tokens_per_s)
    d=$(env $envs "$bin" generate --prompt "The history of computing" --max-tokens 128 --ignore-eos \
        --json 2>/dev/null | field decode_tokens_per_s)
    echo "round $round arm $a [${envs:-default}]: prefill(510) $p tok/s, decode128 $d tok/s"
    port=$((port + 1))
    env $envs "$bin" serve --port $port --served-model-name m --kv-cache-memory 1073741824 \
      > "$out/$label.serve.log" 2>&1 &
    server=$!
    for _ in $(seq 1 120); do
      grep -q "listening" "$out/$label.serve.log" && break
      sleep 1
    done
    "$bin" bench serve --base-url http://127.0.0.1:$port --model m --workload random \
      --input-len 128 --output-len 128 --seed "$round" --concurrency "$streams" \
      --num-requests $((streams * 2)) --warmup-requests "$streams" --no-progress \
      --label "$label" --output "$out/$label.json" > /dev/null
    kill $server
    wait $server 2>/dev/null || true
  done
done
"$bin" bench compare "$out"/arm*-r*.json
