#!/usr/bin/env bash
# Builds llama.cpp at the fixtures' commit (0c1e57098, the source vendored in the PyPI sdist
# llama-cpp-python==0.3.36) for the CPU the fixtures were made on (AVX-512 with VNNI, BF16 and
# VBMI; no AMX, no AVX512-FP16, which would change ggml's code paths), and the reference
# runner `refdump` beside it, and `llama-quantize` (for K-quant test files). Usage: build.sh DIR
# (work space; about 1.5 GB, ~15 min on 2 cores). FLAGS overrides the target CPU (e.g.
# FLAGS=-march=native on a machine without AVX-512, where the fixtures' flags cannot run).
set -euo pipefail
dir=${1:?usage: build.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir" && cd "$dir"
[ -d venv ] || python3 -m venv venv
./venv/bin/pip install -q cmake ninja
[ -f llama_cpp_python-0.3.36.tar.gz ] || ./venv/bin/pip download -q --no-deps llama-cpp-python==0.3.36 -d .
[ -d llama_cpp_python-0.3.36 ] || tar xzf llama_cpp_python-0.3.36.tar.gz
src=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp
flags=${FLAGS:-"-march=icelake-server -mavx512bf16"}
PATH=$PWD/venv/bin:$PATH cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF "-DCMAKE_C_FLAGS=$flags" "-DCMAKE_CXX_FLAGS=$flags" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
PATH=$PWD/venv/bin:$PATH cmake --build "$src/build" -j"$(nproc)" --target llama llama-quantize
b=$src/build
g++ -O2 -std=c++17 $flags "$here/refdump.cpp" -I"$src/include" -I"$src/ggml/include" -o refdump \
    "$b/src/libllama.a" "$b/ggml/src/libggml.a" "$b/ggml/src/libggml-cpu.a" "$b/ggml/src/libggml-base.a" \
    -fopenmp -lpthread -ldl
ln -sf "$b/bin/llama-quantize" llama-quantize
echo "built $PWD/refdump and $PWD/llama-quantize"
