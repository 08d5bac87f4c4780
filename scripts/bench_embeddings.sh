#!/usr/bin/env bash
# Embeddings (issue 28) against their baseline in one run on one server: each text is sent
# once as an embeddings input and once as a completion of one token (`max_tokens: 1`): the
# same prompt computed in the same engine, so the ratio is what pooling costs or saves (the
# embedding skips detokenizing and the LM head's sampling, and computes the same prefill).
# Prefix caching is off, so neither arm finds the other's prompts cached.
#
#   scripts/bench_embeddings.sh [rounds]   (env: SLUICE_BIN, TEXTS (default 64), WORDS (128))
#
# Prints per (round, concurrency): inputs/s of completions, of embeddings (one input per
# request) and of embeddings sent 16 inputs per request, and the ratios to completions.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
. scripts/serve_bg.sh --no-prefix-cache
for _ in $(seq 1 300); do
    curl -sf "$SLUICE_URL/health/ready" >/dev/null && break
    sleep 0.2
done
python3 - "$SLUICE_URL" "$ROUNDS" "${TEXTS:-64}" "${WORDS:-128}" <<'PY'
import json, random, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

url, rounds, n, words = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
vocab = open("README.md").read().split()
rng = random.Random(7)
texts = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]

def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    assert "error" not in out, out
    return out

arms = {
    "completion": lambda t: post("/v1/completions", {"model": "smol", "prompt": t,
                                                      "max_tokens": 1, "temperature": 0}),
    "embedding": lambda t: post("/v1/embeddings", {"model": "smol", "input": t}),
}

def rate(fn, items, concurrency):
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(fn, items))
    return len(texts) / (time.perf_counter() - start)

batches = [texts[i:i + 16] for i in range(0, n, 16)]
post("/v1/embeddings", {"model": "smol", "input": texts[:2]})  # warm-up
print("round concurrency completion_in_s embedding_in_s batched16_in_s emb/compl batched/compl")
for rnd in range(1, rounds + 1):
    for c in (1, 16):
        comp = rate(arms["completion"], texts, c)
        emb = rate(arms["embedding"], texts, c)
        many = rate(lambda b: post("/v1/embeddings", {"model": "smol", "input": b}),
                    batches, max(1, min(c, len(batches))))
        print(f"{rnd} {c} {comp:.1f} {emb:.1f} {many:.1f} {emb / comp:.2f} {many / comp:.2f}")
PY
