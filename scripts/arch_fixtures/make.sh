#!/usr/bin/env bash
# Writes tests/fixtures/architectures/*.json: transformers' reference logits for small seeded
# models of each architecture sluice claims (issue 28; see make_fixtures.py). torch and
# transformers go into a venv under the cache (PyPI's torch brings CUDA libraries: several GB,
# once). The fixtures are committed; the test suite itself needs no torch.
#
#   scripts/arch_fixtures/make.sh [NAME ...]     (all fixtures, or those named)
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
VENV=$CACHE/transformers-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch transformers numpy
fi
mkdir -p tests/fixtures/architectures
"$VENV/bin/python" scripts/arch_fixtures/make_fixtures.py tests/fixtures/architectures "$@"
