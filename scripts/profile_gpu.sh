#!/usr/bin/env bash
# Per-step profile of a decode step (issue 8) on the GPU machine, from the carried binaries
# (scripts/bench_gpu.sh build): Llama-3-8B shape, dummy bf16, context 512, at batch 1 and 64.
#  1. `cuda_kernels profile`: wall time per step with CUDA graphs and eagerly, and the GPU span
#     between CUDA events around the step (graphs on: the kernels back to back; eager minus
#     that: launch gaps and host work the GPU waited for).
#  2. the same under Nsight Compute, one batch size at a time, 3 timed steps per setting,
#     collecting only each kernel's duration (gpu__time_duration.sum): a per-kernel summary
#     (count, average) whose sum over one step is the step's kernel time. The machines have
#     ncu (Firecracker: hardware counters readable) but no nsys.
# Usage (device tool: carry ["target/gpu-bin"]): scripts/profile_gpu.sh   → $OUT/profile*.log
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/gpu-bin
OUT=${OUT:-$BIN/out}
mkdir -p "$OUT"
# shellcheck source=/dev/null
source <(sed -n '/^setup_libs() {/,/^}/p' scripts/bench_gpu.sh)
setup_libs
"$BIN/cuda_kernels" profile 2>&1 | tee "$OUT/profile.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1 || true)
if [ -z "$NCU" ]; then
  echo "no ncu on this machine: kernel times not collected" | tee -a "$OUT/profile.log"
  exit 0
fi
for batch in 1 64; do
  SLUICE_PROFILE_STEPS=3 SLUICE_PROFILE_BATCH=$batch timeout 500 "$NCU" --clock-control none \
    --metrics gpu__time_duration.sum --print-summary per-kernel \
    "$BIN/cuda_kernels" profile >"$OUT/profile-ncu-b$batch.log" 2>&1 || true
  tail -60 "$OUT/profile-ncu-b$batch.log"
done
