#!/usr/bin/env bash
# GPU checks and figures (issues 7 and 8), with binaries built on a machine without a GPU and
# carried to the GPU machine (which has no Rust toolchain and no network). docs/cuda.md says
# what each step checks and prints.
#
#   scripts/bench_gpu.sh build    # here: build, strip and copy into target/gpu-bin (+ configs,
#                                 #   a tokenizer.json exported from the default GGUF)
#   scripts/bench_gpu.sh test     # GPU: tests/cuda_ops (every op vs the CPU, graphs, e2e)
#   scripts/bench_gpu.sh bench [attention|gemv|decode135m|decode8b|profile]
#                                 # GPU: benches/cuda_kernels (all sections by default)
#   scripts/bench_gpu.sh serve    # GPU: sluice serve --device cuda (8B shape, dummy bf16) +
#                                 #   sluice bench serve, concurrency 256, 200 in / 180 out
#   scripts/bench_gpu.sh hf       # GPU: the same load through transformers' generate_batch
#   scripts/bench_gpu.sh ratio    # sluice's output tokens/s over transformers' (both runs above)
#   scripts/bench_gpu.sh gpu      # GPU: test, then bench (one lease call)
#   scripts/bench_gpu.sh dry      # here, no GPU: every path that runs without one
#
# With the device tool: carry ["target/gpu-bin"], command `scripts/bench_gpu.sh gpu` (or
# `serve`, `hf`, `ratio` in one call). Logs and JSON go to $OUT (when set).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/gpu-bin
OUT=${OUT:-$BIN/out}
MODELS=$BIN/models
GGUF=${SLUICE_GGUF:-$HOME/.cache/sluice/models/SmolLM2-135M-Instruct.Q4_1.gguf}
# The serving load of issue 8.
CONCURRENCY=${CONCURRENCY:-256}
INPUT_LEN=${INPUT_LEN:-200}
OUTPUT_LEN=${OUTPUT_LEN:-180}
NUM_REQUESTS=${NUM_REQUESTS:-1024}

build() {
  mkdir -p "$BIN" "$MODELS/llama3-8b" "$MODELS/smollm2-135m"
  local msgs
  msgs=$(mktemp)
  cargo test --release --features cuda --test cuda_ops --no-run --message-format=json >"$msgs"
  cargo build --release --features cuda --bench cuda_kernels --message-format=json >>"$msgs"
  cargo build --release --features cuda --bin sluice --message-format=json >>"$msgs"
  # The executables cargo just built, by target name.
  python3 - "$msgs" "$BIN" <<'PY'
import json, subprocess, sys
msgs, out = sys.argv[1], sys.argv[2]
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in ("cuda_ops", "cuda_kernels", "sluice"):
            subprocess.run(["strip", "--strip-debug", "-o", f"{out}/{name}", m["executable"]], check=True)
            print(f"{out}/{name}")
PY
  rm -f "$msgs"
  write_configs
  "$BIN/cuda_kernels" --export-tokenizer "$GGUF" "$MODELS/smollm2-135m/tokenizer.json"
  # Dummy weights need only a tokenizer whose ids fit the vocabulary: SmolLM2's (49,152 ids).
  cp "$MODELS/smollm2-135m/tokenizer.json" "$MODELS/llama3-8b/tokenizer.json"
  du -sh "$BIN"
}

# Hugging Face config.json files of the two shapes (the loader's `--load-format dummy` and
# transformers' LlamaConfig both read them).
write_configs() {
  cat >"$MODELS/llama3-8b/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "tie_word_embeddings": false, "attention_bias": false, "hidden_act": "silu",
 "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
JSON
  cat >"$MODELS/smollm2-135m/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
 "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
 "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
 "tie_word_embeddings": true, "attention_bias": false, "hidden_act": "silu",
 "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
JSON
}

# cudarc (built for CUDA 12.9) dlopens libcublas/libnvrtc by their unversioned names first,
# then .so.12: point those names at whatever CUDA this machine has (CUDA 13 here: the
# toolkit's lib64, else PyTorch's nvidia/*/lib wheels). libcuda.so.1 comes with the driver.
setup_libs() {
  local links=/tmp/sluice-cuda-libs dirs=()
  mkdir -p "$links"
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
  local site
  site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
  if [ -n "$site" ]; then
    while IFS= read -r d; do dirs+=("$d"); done < <(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null)
  fi
  for lib in cublas cublasLt nvrtc; do
    for d in "${dirs[@]}"; do
      local f
      f=$(ls "$d"/lib$lib.so.[0-9]* 2>/dev/null | sort -V | tail -1 || true)
      if [ -n "$f" ]; then
        ln -sf "$f" "$links/lib$lib.so"
        echo "lib$lib.so -> $f"
        break
      fi
    done
  done
  local path="$links"
  for d in "${dirs[@]}"; do path="$path:$d"; done
  export LD_LIBRARY_PATH="$path:${LD_LIBRARY_PATH:-}"
  # The NVRTC CUBIN cache: a fresh machine compiles once per run.
  export SLUICE_CACHE=${SLUICE_CACHE:-/tmp/sluice-cache}
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
}

# A card is present: nvidia-smi runs and lists one.
card_present() {
  nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

run_tests() {
  mkdir -p "$OUT"
  # One test at a time: each opens the GPU, and their timings stay apart. A failing test
  # fails the script (pipefail).
  "$BIN/cuda_ops" --test-threads=1 --nocapture 2>&1 | tee "$OUT/cuda_ops.log"
  # The tests pass as skipped only where there is no driver or no device; with a card here,
  # a skip means the card was not used, and that is a failure.
  if card_present && grep -q 'skipped: no GPU' "$OUT/cuda_ops.log"; then
    echo "FAILED: a GPU is present but tests were skipped:" >&2
    grep 'skipped: no GPU' "$OUT/cuda_ops.log" | sort | uniq -c >&2
    return 1
  fi
}

run_bench() {
  mkdir -p "$OUT"
  "$BIN/cuda_kernels" "$@" 2>&1 | tee "$OUT/cuda_kernels.log"
}

# `sluice serve` on $1 (device) in the background; waits for /health. Sets $server.
start_server() {
  local device=$1 port=$2 model=$3
  mkdir -p "$OUT"
  # The KV budget is sized from host memory unless given: on a GPU give it (40 GB holds
  # 300k tokens of the 8B shape's bf16 KV, beside 16 GB of weights on an 80 GB card).
  local kv=()
  [[ $device == cuda* ]] && kv=(--kv-cache-memory "${KV_CACHE_MEMORY:-40000000000}")
  "$BIN/sluice" serve --device "$device" --load-format dummy --model "$model" \
    --served-model-name bench --port "$port" --max-num-seqs "$CONCURRENCY" "${kv[@]}" \
    >"$OUT/serve.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    kill -0 $server 2>/dev/null || { tail -20 "$OUT/serve.log"; return 1; }
    sleep 1
  done
  echo "the server did not come up"; tail -20 "$OUT/serve.log"; return 1
}

serve() {
  local device=${DEVICE:-cuda} port=18190 model=${MODEL:-$MODELS/llama3-8b}
  start_server "$device" "$port" "$model"
  "$BIN/sluice" bench serve --base-url "http://127.0.0.1:$port" --model bench --workload random \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --concurrency "$CONCURRENCY" \
    --num-requests "$NUM_REQUESTS" --tokenizer "$model/tokenizer.json" --no-progress \
    --label "sluice-$device" --output "$OUT/serve.json" 2>&1 | tee "$OUT/bench_serve.log"
  kill $server 2>/dev/null || true
}

hf() {
  mkdir -p "$OUT"
  PYTHONUNBUFFERED=1 python3 scripts/bench_hf_cb.py --config "${MODEL:-$MODELS/llama3-8b}/config.json" \
    --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --num-requests "$NUM_REQUESTS" --output "$OUT/hf.json" 2>&1 | tee "$OUT/hf.log"
}

ratio() {
  python3 - "$OUT/serve.json" "$OUT/hf.json" <<'PY'
import json, sys
def find(o, key):
    if isinstance(o, dict):
        if key in o:
            return o[key]
        for v in o.values():
            r = find(v, key)
            if r is not None:
                return r
    return None
s = find(json.load(open(sys.argv[1])), "output_throughput")
h = find(json.load(open(sys.argv[2])), "output_throughput")
print(f"output tokens/s: sluice {s:.1f}, transformers generate_batch {h:.1f}, ratio {s / h:.2f}x")
PY
}

# Every path that runs without a GPU: the binaries say "skipped: no GPU", the exported
# tokenizer and configs exist, the HF script parses its arguments, and the serve path runs on
# the CPU at a tiny load against the default model's shape.
dry() {
  run_tests | tail -3
  run_bench | tail -2
  test -s "$MODELS/llama3-8b/config.json" && test -s "$MODELS/llama3-8b/tokenizer.json"
  python3 scripts/bench_hf_cb.py --help >/dev/null
  DEVICE=cpu MODEL=$MODELS/smollm2-135m CONCURRENCY=2 INPUT_LEN=8 OUTPUT_LEN=4 NUM_REQUESTS=4 serve
}

case "${1:-}" in
  build) build ;;
  test) setup_libs; run_tests ;;
  bench) shift; setup_libs; run_bench "$@" ;;
  serve) setup_libs; serve ;;
  hf) hf ;;
  ratio) ratio ;;
  dry) dry ;;
  # The figures run even when a test fails (they say how fast, the log says how wrong).
  gpu) setup_libs; status=0; run_tests || status=$?; run_bench; exit "$status" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
