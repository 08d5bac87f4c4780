"""Per-key rate limits, through the official `openai` package (tests/api_connections.rs).

Keys (from the server's --api-keys-file): `key-rpm2` (2 requests a minute), `key-tpm30` (30
tokens a minute), `key-rpm60` (60 requests a minute), `key-free` (no limits).
"""

import os
import sys
import time

import openai
from openai import OpenAI

URL = os.environ["SLUICE_URL"] + "/v1"
MODEL = os.environ["SLUICE_MODEL"]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def client(key, retries=0):
    return OpenAI(base_url=URL, api_key=key, max_retries=retries, timeout=120)


def complete(c, max_tokens=1):
    return c.completions.with_raw_response.create(
        model=MODEL, prompt="Hi", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )


def requests_per_minute():
    c = client("key-rpm2")
    for remaining in ("1", "0"):
        r = complete(c)
        h = r.headers
        check("rpm headers", h["x-ratelimit-limit-requests"] == "2"
              and h["x-ratelimit-remaining-requests"] == remaining, dict(h))
        check("rpm reset", h["x-ratelimit-reset-requests"].endswith("s"), h["x-ratelimit-reset-requests"])
        check("no token headers without a token limit", "x-ratelimit-limit-tokens" not in h, dict(h))
    try:
        complete(c)
        check("third request refused", False)
    except openai.RateLimitError as e:
        h = e.response.headers
        check("429", e.status_code == 429, e.status_code)
        err = e.body
        check("error type names the limit", err["type"] == "requests" and err["code"] == "rate_limit_exceeded", err)
        check("message says the numbers", "Limit 2, Used 2, Requested 1" in err["message"], err["message"])
        check("retry-after", 1 <= int(h["retry-after"]) <= 30 and int(h["retry-after-ms"]) > 0, dict(h))
        check("headers on the refusal", h["x-ratelimit-remaining-requests"] == "0", dict(h))
    # Other endpoints are not generation requests: not counted, still answered.
    check("models still listed", [m.id for m in c.models.list().data] == [MODEL])


def tokens_per_minute():
    c = client("key-tpm30")
    r = complete(c, max_tokens=40)
    usage = r.parse().usage
    h = r.headers
    check("tpm limit header", h["x-ratelimit-limit-tokens"] == "30", dict(h))
    # Charged when it ended, after its headers were sent: the next request sees the debt.
    try:
        complete(c)
        check("over the token budget refused", False)
    except openai.RateLimitError as e:
        check("tokens 429", e.body["type"] == "tokens", e.body)
        check("remaining tokens 0", e.response.headers["x-ratelimit-remaining-tokens"] == "0", dict(e.response.headers))
        check("usage was charged", usage.total_tokens > 30, usage)


def sdk_retries_after_the_reset():
    c = client("key-rpm60")
    # 60 at once, then one a second: requests refill while these run, so go until refused.
    for sent in range(600):
        try:
            complete(c)
        except openai.RateLimitError as e:
            wait_ms = int(e.response.headers["retry-after-ms"])
            check("a second at 60 a minute", 0 < wait_ms <= 1000, wait_ms)
            break
    else:
        check("refused at last", False)
    check("the first 60 at once", sent >= 60, sent)
    # The SDK's own retry reads retry-after-ms and succeeds once a request has refilled.
    start = time.monotonic()
    r = client("key-rpm60", retries=3).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    check("retried into success", r.usage.completion_tokens == 1, r)
    check("it waited", time.monotonic() - start < 10)


def unlimited_and_unknown_keys():
    h = complete(client("key-free")).headers
    check("no limits, no headers", not any(k.startswith("x-ratelimit") for k in h), dict(h))
    try:
        complete(client("nope"))
        check("unknown key refused", False)
    except openai.AuthenticationError as e:
        check("401", e.status_code == 401)


requests_per_minute()
tokens_per_minute()
sdk_retries_after_the_reset()
unlimited_and_unknown_keys()
print("all rate limit checks passed")
