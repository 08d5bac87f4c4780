#!/usr/bin/env python3
"""Constrained vs unconstrained decoding throughput (issue 18): 16 concurrent streamed chat
requests on the same prompts, once free (ignore_eos) and once under a JSON schema that cannot
complete within max_tokens, so both arms generate exactly max_tokens per stream. Arms alternate
(free, schema, free, schema, ...) so that background load affects both; prints each run's
output tok/s and the median ratio schema/free.

Usage: scripts/bench_structured.py URL [--streams 16] [--max-tokens 128] [--runs 3]
    [--server-pid PID]
against a running `sluice serve` (e.g. scripts/serve_bg.sh, --max-num-seqs >= streams).
With --server-pid (a server on this machine), each arm also reports the server's CPU time
(user + system, from /proc) per 1,000 output tokens: steadier than tok/s when other work
shares the cores. Standard library only.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import time
import urllib.request

# Records of at least 40 items: never complete within a few hundred tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                    "colour": {"enum": ["red", "green", "blue"]},
                },
                "required": ["name", "qty", "colour"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
TOPICS = ["groceries", "tools", "books", "toys", "plants", "paints", "shoes", "spices",
          "fabrics", "coins", "stamps", "shells", "maps", "lamps", "clocks", "cups"]


def stream_one(url, i, args, constrained):
    body = {
        "messages": [{"role": "user", "content": f"List {TOPICS[i % len(TOPICS)]} as JSON."}],
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "inventory", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    tokens, finish = 0, None
    with urllib.request.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                finish = c.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, finish


def cpu_seconds(pid):
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_arm(url, args, constrained):
    cpu_start = cpu_seconds(args.server_pid)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.streams) as pool:
        results = list(pool.map(lambda i: stream_one(url, i, args, constrained),
                                range(args.streams)))
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(args.server_pid) - cpu_start
    tokens = sum(t for t, _ in results)
    finishes = sorted({f for _, f in results})
    return tokens / elapsed, tokens, finishes, 1000 * cpu / max(tokens, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server-pid", type=int)
    args = p.parse_args()
    url = args.url.rstrip("/")
    warm = argparse.Namespace(streams=2, max_tokens=8, server_pid=None)
    run_arm(url, warm, True)  # warm-up: the token trie, llguidance's caches
    ratios, cpu_ratios = [], []
    for r in range(args.runs):
        free, free_tokens, free_fin, free_cpu = run_arm(url, args, False)
        schema, schema_tokens, schema_fin, schema_cpu = run_arm(url, args, True)
        ratios.append(schema / free)
        line = (f"run {r}: free {free:.1f} tok/s ({free_tokens} tokens, {free_fin}), "
                f"schema {schema:.1f} tok/s ({schema_tokens} tokens, {schema_fin}), "
                f"ratio {schema / free:.3f}")
        if args.server_pid:
            cpu_ratios.append(schema_cpu / free_cpu)
            line += (f"; server CPU s per 1k tokens: free {free_cpu:.2f}, "
                     f"schema {schema_cpu:.2f}")
        print(line)
    print(f"median ratio schema/free (tok/s): {statistics.median(ratios):.3f}")
    if cpu_ratios:
        print(f"median ratio schema/free (server CPU per token): "
              f"{statistics.median(cpu_ratios):.3f}")


main()
