"""Scrapes `/metrics` of a running `sluice serve` with Prometheus's own text parser
(`prometheus_client.parser`) and holds it against vLLM's metric names, types and buckets, as
vLLM V1 defines them (`vllm/v1/metrics/loggers.py`) and its docs list them.

Run by tests/api_metrics.rs with SLUICE_URL, SLUICE_MODEL and MAX_MODEL_LEN set, after it sent
requests; exits non-zero on the first failed check.
"""

import os
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

URL = os.environ["SLUICE_URL"]
MODEL = os.environ["SLUICE_MODEL"]
MAX_MODEL_LEN = int(os.environ["MAX_MODEL_LEN"])

TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
       20.0, 40.0, 80.0]
REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def one_two_five(max_value):
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_value:
                return [float(b) for b in out]
            out.append(v)
        exp += 1


TOKENS = one_two_five(MAX_MODEL_LEN)
ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

# vLLM's family name (as the parser reports it: counters without `_total`), type, buckets.
VLLM = {
    "vllm:num_requests_running": ("gauge", None),
    "vllm:num_requests_waiting": ("gauge", None),
    "vllm:kv_cache_usage_perc": ("gauge", None),
    "vllm:cache_config_info": ("gauge", None),
    "vllm:prefix_cache_queries": ("counter", None),
    "vllm:prefix_cache_hits": ("counter", None),
    "vllm:num_preemptions": ("counter", None),
    "vllm:prompt_tokens": ("counter", None),
    "vllm:generation_tokens": ("counter", None),
    "vllm:request_success": ("counter", None),
    "vllm:request_prompt_tokens": ("histogram", TOKENS),
    "vllm:request_generation_tokens": ("histogram", TOKENS),
    "vllm:request_max_num_generation_tokens": ("histogram", TOKENS),
    "vllm:request_params_max_tokens": ("histogram", TOKENS),
    "vllm:request_params_n": ("histogram", [1, 2, 5, 10, 20]),
    "vllm:iteration_tokens_total": ("histogram", ITERATION),
    "vllm:time_to_first_token_seconds": ("histogram", TTFT),
    "vllm:inter_token_latency_seconds": ("histogram", ITL),
    "vllm:e2e_request_latency_seconds": ("histogram", REQUEST),
    "vllm:request_queue_time_seconds": ("histogram", REQUEST),
    "vllm:request_inference_time_seconds": ("histogram", REQUEST),
    "vllm:request_prefill_time_seconds": ("histogram", REQUEST),
    "vllm:request_decode_time_seconds": ("histogram", REQUEST),
    "vllm:spec_decode_num_drafts": ("counter", None),
    "vllm:spec_decode_num_draft_tokens": ("counter", None),
    "vllm:spec_decode_num_accepted_tokens": ("counter", None),
}


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


text = urllib.request.urlopen(URL + "/metrics", timeout=30).read().decode()
families = {f.name: f for f in text_string_to_metric_families(text)}

for name, (kind, buckets) in VLLM.items():
    f = families.get(name)
    check(f"{name} exported", f is not None, sorted(families))
    check(f"{name} is a {kind}", f.type == kind, f.type)
    for s in f.samples:
        labels = s.labels
        if labels.get("model_name") != MODEL or labels.get("engine") != "0":
            check(f"{name} labels", False, s)
    if buckets is not None:
        les = [float(s.labels["le"]) for s in f.samples if s.name.endswith("_bucket")]
        check(f"{name} buckets", les == [float(b) for b in buckets] + [float("inf")], les)

config = families["vllm:cache_config_info"].samples[0].labels
check("cache_config_info names the block size and block count",
      int(config["block_size"]) > 0 and int(config["num_gpu_blocks"]) > 0, config)

# The requests the driver sent show up, under both names.
for name in ("prompt_tokens", "generation_tokens"):
    vllm = sum(s.value for s in families[f"vllm:{name}"].samples if s.name.endswith("_total"))
    own = sum(s.value for s in families[f"sluice:{name}"].samples if s.name.endswith("_total"))
    check(f"{name} counted, the same under both names", vllm > 0 and vllm == own, (vllm, own))
ttft = [s.value for s in families["vllm:time_to_first_token_seconds"].samples
        if s.name.endswith("_count")]
check("time to first token observed", sum(ttft) >= 2, ttft)

for f in families.values():
    for s in f.samples:
        if s.labels.get("model_name") != MODEL:
            check(f"{f.name} carries model_name", False, s)
check("every series carries model_name", True)
print("all checks passed")
