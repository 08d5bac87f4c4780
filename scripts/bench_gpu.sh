#!/usr/bin/env bash
# First GPU figures (issue 7), run on the GPU machine with binaries built elsewhere:
#   cargo build --release --features cuda   (and carry target/release/sluice)
# The CUDA 12.9 build of cudarc looks for libnvrtc.so / libcublas.so / libcuda.so.1 by name:
# point LD_LIBRARY_PATH at the toolkit's lib64 (or PyTorch's nvidia/*/lib) first.
set -euo pipefail
SLUICE=${SLUICE:-./target/release/sluice}
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia,os;p=os.path.dirname(nvidia.__path__[0]);print(" ".join(os.path.join(p,"nvidia",x,"lib") for x in os.listdir(os.path.join(p,"nvidia"))))' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

# 1. Decode attention bandwidth beside device-to-device copy bandwidth, same run.
#    (entry point still to be written: see docs/cuda.md, "What remains")
# 2. Time per output token, Llama-3-8B-shaped dummy bf16 model, batch 1.
# 3. `sluice generate` tokens/s at the default model's shape.
"$SLUICE" generate --device cuda --max-tokens 256 "Write a story about a lighthouse." 2>&1 | tail -5
