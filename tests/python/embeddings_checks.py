"""`/v1/embeddings` through the official `openai` package (tests/api_embeddings.rs).

The SDK asks for base64 unless told otherwise and decodes it without numpy (this venv has
none); floats give the same f32 values. One vector per input, in order, each the same as the
input alone (the batch does not change a vector); token-id inputs equal their text; vectors
are unit length unless `normalize` is false; `dimensions`, empty inputs, unknown fields and
inputs longer than the context are 400s naming the field. Concurrent embeddings beside chat
streams get their vectors unchanged. With EMBED_BATCH=1 (a server with --data-dir) a Batch
API batch on /v1/embeddings returns the online vectors. With EMBED_POOLING=mean the server
pools the mean.
"""

import io
import json
import math
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import urllib.request

import openai
from openai import OpenAI

URL = os.environ["SLUICE_URL"]
MODEL = os.environ["SLUICE_MODEL"]
client = OpenAI(base_url=URL + "/v1", api_key=os.environ["SLUICE_API_KEY"], max_retries=0,
                timeout=300)
HIDDEN = 576  # the default model's hidden size


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def embed(inp, **kw):
    return client.embeddings.create(model=MODEL, input=inp, **kw)


TEXTS = [
    "The cat sat on the mat.",
    "Rivers carry sediment from mountains to the sea, building deltas over centuries.",
    "Quarterly revenue grew by eight percent.",
]

# The SDK's default: base64, decoded by the SDK.
r = embed(TEXTS[0])
v = r.data[0].embedding
check("base64 (SDK default): one vector of the hidden size", len(r.data) == 1 and len(v) == HIDDEN,
      len(v))
check("response shape", r.object == "list" and r.data[0].object == "embedding"
      and r.data[0].index == 0 and r.model == MODEL, r)
check("unit length", abs(norm(v) - 1.0) < 1e-5, norm(v))
req = urllib.request.Request(
    URL + "/tokenize", data=json.dumps({"model": MODEL, "prompt": TEXTS[0]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["SLUICE_API_KEY"],
             "Content-Type": "application/json"})
with urllib.request.urlopen(req) as resp:
    tokens = json.load(resp)
check("usage counts the input's tokens", r.usage.prompt_tokens == tokens["count"]
      and r.usage.total_tokens == tokens["count"], (r.usage, tokens))

floats = embed(TEXTS[0], encoding_format="float").data[0].embedding
check("float format: the same f32 values", [f32(x) for x in floats] == v)

# Several inputs: in order, each as alone.
alone = [embed(t).data[0].embedding for t in TEXTS]
many = embed(TEXTS)
check("one vector per input, indexed in order", [d.index for d in many.data] == [0, 1, 2])
check("each input's vector as alone", [d.embedding for d in many.data] == alone)
check("usage sums the inputs", many.usage.prompt_tokens
      == sum(embed(t).usage.prompt_tokens for t in TEXTS))
check("different texts, different vectors", len({tuple(a) for a in alone}) == 3)

# Token ids: the same as their text.
ids = embed(tokens["tokens"]).data[0].embedding
check("token ids give their text's vector", ids == v)
check("lists of token ids", [d.embedding for d in embed([tokens["tokens"]] * 2).data] == [v, v])

# normalize: false (vLLM's extension) gives the raw pooled state.
raw = embed(TEXTS[0], extra_body={"normalize": False}).data[0].embedding
n = norm(raw)
check("normalize false: not unit length", abs(n - 1.0) > 1e-3, n)
check("normalize false: the same direction", max(abs(a / n - b) for a, b in zip(raw, v)) < 1e-5)


def refused(param, **kw):
    try:
        client.embeddings.create(model=MODEL, **kw)
    except openai.BadRequestError as e:
        check(f"{param}: 400 naming it", e.body.get("param") == param, e.body)
        return
    check(f"{param}: refused", False, kw)


refused("dimensions", input="x", dimensions=8)
refused("input", input="")
refused("input", input=[])
refused("input", input=["ok", ""])
refused("input", input=[[1, 2], [49152 * 4]])
refused("input", input=[7] * 5000)
refused("encoding_format", input="x", encoding_format="hex")
refused("truncate_prompt_tokens", input="x", extra_body={"truncate_prompt_tokens": 4})
try:
    client.embeddings.create(model="no-such-model", input="x")
    check("unknown model refused", False)
except openai.NotFoundError:
    check("unknown model: 404", True)

# Concurrent embeddings beside chat streams: the vectors do not change.


def chat_stream(i):
    s = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Count to {20 + i}."}],
        max_tokens=40, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in s if c.choices)


with ThreadPoolExecutor(12) as pool:
    chats = [pool.submit(chat_stream, i) for i in range(4)]
    got = [pool.submit(lambda i=i: embed(TEXTS[i % 3]).data[0].embedding) for i in range(12)]
    check("concurrent embeddings equal the ones alone",
          all(g.result() == alone[i % 3] for i, g in enumerate(got)))
    check("chat streams beside them finish", all(c.result() for c in chats))

if os.environ.get("EMBED_BATCH") == "1":
    lines = [json.dumps({"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": MODEL, "input": t, "encoding_format": "float"}})
             for i, t in enumerate(TEXTS)]
    f = client.files.create(file=("emb.jsonl", io.BytesIO("\n".join(lines).encode())),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        check("batch finishes in time", time.time() < deadline, batch)
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    check("embeddings batch completed", batch.status == "completed"
          and batch.request_counts.completed == 3, batch)
    records = [json.loads(line)
               for line in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {r["custom_id"]: r["response"]["body"]["data"][0]["embedding"] for r in records}
    check("batch lines give the online vectors",
          all([f32(x) for x in by_id[f"t{i}"]] == alone[i] for i in range(3)))

print("all checks passed")
