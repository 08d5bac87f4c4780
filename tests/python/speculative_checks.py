"""Speculative decoding through the official `openai` package (tests/api_speculative.rs):
the server runs with --speculative-config; a request's `speculative` (sent with
`extra_body`) changes nothing but speed. Greedy and seeded, whole and streamed, the same
text and logprobs on and off; a malformed `speculative` is a 400 naming it; the vLLM-named
counters show drafts accepted.
"""

import os
import sys
import urllib.request

import openai
from openai import OpenAI

URL = os.environ["SLUICE_URL"]
MODEL = os.environ["SLUICE_MODEL"]
client = OpenAI(base_url=URL + "/v1", api_key=os.environ["SLUICE_API_KEY"], max_retries=0,
                timeout=300)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


# A text the model goes on repeating, so prompt-lookup drafts are accepted.
LINE = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
MESSAGES = [{"role": "user", "content": f"Repeat this line ten times:\n{LINE}\n{LINE}\n"}]


def chat(spec, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, logprobs=True, top_logprobs=2,
        extra_body={"speculative": spec}, **kw)


def lps(r):
    return [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
            for t in r.choices[0].logprobs.content]


for kw in [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 1234}]:
    off, on = chat(False, **kw), chat(True, **kw)
    what = "greedy" if kw["temperature"] == 0 else "seeded"
    check(f"{what}: same text on and off", off.choices[0].message.content
          == on.choices[0].message.content, (off.choices[0].message.content,
                                             on.choices[0].message.content))
    check(f"{what}: same logprobs", lps(off) == lps(on))
    check(f"{what}: same usage", off.usage.completion_tokens == on.usage.completion_tokens)
    stream = chat(True, stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(f"{what}: streamed text the same", text == off.choices[0].message.content, text)

try:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                   extra_body={"speculative": "yes"})
    check("speculative: 'yes' refused", False)
except openai.BadRequestError as e:
    check("speculative: 'yes' refused naming it", "speculative" in str(e), str(e))

metrics = urllib.request.urlopen(URL + "/metrics", timeout=30).read().decode()


def value(name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
               if l.startswith(name + "{"))


drafts = value("vllm:spec_decode_num_drafts_total")
accepted = value("vllm:spec_decode_num_accepted_tokens_total")
per_pos = value("vllm:spec_decode_num_accepted_tokens_per_pos_total")
check("drafts verified and accepted", drafts > 0 and accepted > 0, (drafts, accepted))
check("per-position counts add up", per_pos == accepted, (per_pos, accepted))
print("all checks passed")
