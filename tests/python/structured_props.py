"""Property test: JSON schemas drawn by a seeded generator (nesting, enums, anyOf, arrays with
minItems/maxItems, string patterns and lengths, bounded integers, booleans), each sent to
`sluice serve` as `response_format` json_schema; every completed output must validate.

Run by tests/structured.rs with SLUICE_URL and SLUICE_API_KEY set, in a venv with `jsonschema`
(the requests go through the standard library). The generator bounds every size so outputs
complete well within max_tokens; an output cut by `length` is reported and fails the run, as
does any output that does not validate.
"""

import concurrent.futures
import json
import os
import random
import sys
import urllib.request

import jsonschema

URL = os.environ["SLUICE_URL"] + "/v1/chat/completions"
KEY = os.environ["SLUICE_API_KEY"]
NUM_SCHEMAS = int(os.environ.get("NUM_SCHEMAS", "24"))
SEED = int(os.environ.get("SEED", "18"))
WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "x1"]


def leaf(rng):
    kind = rng.choice(["string", "pattern", "enum", "integer", "boolean", "anyof"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 10)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(
            ["^[a-z]{2,6}$", "^[A-Z][a-z]{1,5}$", "^[0-9]{3}-[0-9]{2}$", "^(foo|bar)[0-9]?$"])}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 900)}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"anyOf": [leaf(rng), leaf(rng)]}


def schema(rng, depth):
    if depth == 0 or rng.random() < 0.3:
        return leaf(rng)
    if rng.random() < 0.4:
        lo = rng.randint(0, 2)
        return {"type": "array", "items": schema(rng, depth - 1),
                "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "kind", "size", "tags", "ok", "meta"], rng.randint(1, 3))
    props = {n: schema(rng, depth - 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def ask(case):
    i, s = case
    body = {
        "messages": [{"role": "user", "content": "Reply with JSON."}],
        "max_tokens": 256,
        "temperature": 0.7,
        "seed": i,
        "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}},
    }
    req = urllib.request.Request(URL, data=json.dumps(body).encode(), headers={
        "content-type": "application/json", "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main():
    rng = random.Random(SEED)
    cases = [(i, schema(rng, rng.randint(1, 3))) for i in range(NUM_SCHEMAS)]
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for (i, s), r in zip(cases, pool.map(ask, cases)):
            c = r["choices"][0]
            text = c["message"]["content"]
            if c["finish_reason"] != "stop":
                failures.append(f"schema {i}: finish_reason {c['finish_reason']}: {text!r}")
                continue
            try:
                jsonschema.validate(json.loads(text), s)
                print(f"ok   schema {i}: {text}")
            except (ValueError, jsonschema.ValidationError) as e:
                failures.append(f"schema {i}: {json.dumps(s)}\n  output {text!r}\n  {e}")
    for f in failures:
        print("FAIL", f)
    if failures:
        sys.exit(1)
    print(f"all outputs valid ({len(cases)} schemas)")


main()
