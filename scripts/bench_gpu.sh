#!/usr/bin/env bash
# GPU checks and first figures (issue 7), with binaries built on a machine without a GPU and
# carried to the GPU machine (which has no Rust toolchain). docs/cuda.md says what each checks.
#
#   scripts/bench_gpu.sh build   # here: build, strip (< 5 MB each) and copy into target/gpu-bin
#   scripts/bench_gpu.sh test    # GPU machine: tests/cuda_ops (every op vs the CPU, e2e)
#   scripts/bench_gpu.sh bench   # GPU machine: benches/cuda_kernels (attention GB/s, 8B decode)
#   scripts/bench_gpu.sh gpu     # GPU machine: test, then bench (one lease call)
#
# With the device tool: carry ["target/gpu-bin"], command `scripts/bench_gpu.sh gpu`. Logs go
# to $OUT (when set) as cuda_ops.log and cuda_kernels.log.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/gpu-bin
OUT=${OUT:-$BIN/out}

build() {
  local target=${CARGO_TARGET_DIR:-target}
  mkdir -p "$BIN"
  local msgs
  msgs=$(mktemp)
  cargo test --release --features cuda --test cuda_ops --no-run --message-format=json >"$msgs"
  cargo build --release --features cuda --bench cuda_kernels --message-format=json >>"$msgs"
  # The executables cargo just built, by target name.
  python3 - "$msgs" "$BIN" <<'PY'
import json, shutil, subprocess, sys
msgs, out = sys.argv[1], sys.argv[2]
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in ("cuda_ops", "cuda_kernels"):
            subprocess.run(["strip", "--strip-debug", "-o", f"{out}/{name}", m["executable"]], check=True)
            print(f"{out}/{name}")
PY
  rm -f "$msgs"
  ls -la "$BIN"
  echo "target dir: $target"
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

run_tests() {
  mkdir -p "$OUT"
  # One test at a time: each opens the GPU, and their timings stay apart.
  "$BIN/cuda_ops" --test-threads=1 --nocapture 2>&1 | tee "$OUT/cuda_ops.log"
}

run_bench() {
  mkdir -p "$OUT"
  "$BIN/cuda_kernels" "$@" 2>&1 | tee "$OUT/cuda_kernels.log"
}

case "${1:-}" in
  build) build ;;
  test) setup_libs; run_tests ;;
  bench) shift; setup_libs; run_bench "$@" ;;
  # The figures run even when a test fails (they say how fast, the log says how wrong).
  gpu) setup_libs; status=0; run_tests || status=$?; run_bench; exit "$status" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
