"""`langchain-openai`'s `OpenAIEmbeddings` against `sluice serve` (tests/api_embeddings.rs):
`embed_documents` and `embed_query` give the vectors the server gives for each text alone.
`check_embedding_ctx_length=False` is how LangChain talks to a server that is not OpenAI's:
otherwise it sends tiktoken's token ids, which belong to another vocabulary.

Run in its own venv, with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set.
"""

import os
import sys

import httpx
from langchain_openai import OpenAIEmbeddings

URL, MODEL, KEY = os.environ["SLUICE_URL"], os.environ["SLUICE_MODEL"], os.environ["SLUICE_API_KEY"]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def online(text):
    r = httpx.post(URL + "/v1/embeddings", json={"model": MODEL, "input": text},
                   headers={"Authorization": "Bearer " + KEY}, timeout=300)
    return r.json()["data"][0]["embedding"]


def close(a, b):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


emb = OpenAIEmbeddings(model=MODEL, base_url=URL + "/v1", api_key=KEY,
                       check_embedding_ctx_length=False, max_retries=0, timeout=300)
texts = ["Bread rises because yeast makes gas.", "The moon has no air.", "Maps fold badly."]
docs = emb.embed_documents(texts)
check("langchain: one vector per document", len(docs) == 3 and all(len(d) == 576 for d in docs))
check("langchain: documents' vectors are the server's", all(close(d, online(t))
                                                           for d, t in zip(docs, texts)))
check("langchain: embed_query", close(emb.embed_query(texts[1]), docs[1]))
print("all langchain embedding checks passed")
