#!/usr/bin/env bash
# Real K-quant files against llama.cpp (issue 28): builds llama.cpp's `llama-quantize` and
# `refdump` for this CPU (build.sh, ~15 min the first time; kept in the cache), then runs the
# ignored test `gguf_types::llama_quantize_files_agree_with_llama_cpp`: the default model
# requantized to Q4_K_M and Q5_K_M by llama-quantize, sluice's teacher-forced logits on each
# file against llama.cpp's on the same file (top-1 equal but at near-ties).
#
#   scripts/llama_cpp_reference/kquant_files.sh   (env: SLUICE_LLAMA_CPP_DIR to reuse a build)
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
DIR=${SLUICE_LLAMA_CPP_DIR:-$CACHE/llama-cpp-native}
if [ ! -x "$DIR/refdump" ] || [ ! -x "$DIR/llama-quantize" ]; then
    FLAGS=-march=native scripts/llama_cpp_reference/build.sh "$DIR"
fi
SLUICE_LLAMA_CPP_DIR=$DIR cargo test --release --test integration -- --ignored --nocapture \
    gguf_types::llama_quantize_files_agree_with_llama_cpp
