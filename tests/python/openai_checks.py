"""Drives `sluice serve` with the official `openai` package, as users' code would.

Run by tests/api_openai.rs with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set; exits
non-zero on the first failed check. Token counts stay tiny: the model runs on the CPU.
"""

import os
import sys

import openai
from openai import OpenAI

URL = os.environ["SLUICE_URL"] + "/v1"
MODEL = os.environ["SLUICE_MODEL"]
KEY = os.environ["SLUICE_API_KEY"]

client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=300)
MESSAGES = [{"role": "user", "content": "What is 12 times 7?"}]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def models():
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    check("models list", ids == [MODEL], ids)


def chat():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    c = r.choices[0]
    check("chat object", r.object == "chat.completion", r.object)
    check("chat message", c.message.role == "assistant" and len(c.message.content) > 0, c)
    check("chat finish_reason", c.finish_reason in ("length", "stop"), c.finish_reason)
    check("chat usage", r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 10, r.usage)
    check(
        "chat usage total",
        r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
        r.usage,
    )
    return c.message.content


def chat_stream(expected):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    first = chunks[0].choices[0]
    check("stream first chunk role", first.delta.role == "assistant" and first.delta.content == "", first)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check("stream text equals non-stream", text == expected, (text, expected))
    finals = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check("stream finish_reason once", len(finals) == 1 and finals[0].finish_reason == "length", finals)
    check("stream stop_reason field", "stop_reason" in (finals[0].model_extra or {}), finals[0])
    last = chunks[-1]
    check("stream usage chunk", last.choices == [] and last.usage.completion_tokens == 4, last)
    details = last.usage.prompt_tokens_details
    check("stream usage cached_tokens", details is not None and details.cached_tokens >= 0, last.usage)
    # The same prompt again: its full blocks come from the prefix cache.
    check("prefix cache hit", details.cached_tokens > 0, details)


def chat_n2_and_logprobs():
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=1.0,
        seed=11,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    check("n=2 choices", [c.index for c in r.choices] == [0, 1], r.choices)
    for c in r.choices:
        lp = c.logprobs.content
        check("chat logprobs per token", len(lp) == 3, lp)
        check("chat top_logprobs", all(len(t.top_logprobs) == 2 for t in lp), lp)
        check("chat logprob values", all(t.logprob <= 0 for t in lp), lp)
    check("n=2 usage", r.usage.completion_tokens == 6, r.usage)


def seed_reproducible():
    def once():
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=1234
        ).choices[0].message.content

    a, b = once(), once()
    check("seed reproducible", a == b, (a, b))


def completions():
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    c = r.choices[0]
    check("completion text", c.text.startswith(" Paris"), c.text)
    check("completion usage", r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 3, r.usage)
    s = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, stream=True
    )
    text = "".join(ch.choices[0].text for ch in s if ch.choices)
    check("completion stream text", text == c.text, (text, c.text))


def completions_variants():
    r = client.completions.create(
        model=MODEL,
        prompt=["The capital of France is", "Once upon a time"],
        max_tokens=2,
        temperature=0,
        echo=True,
        logprobs=1,
    )
    check("two prompts, two choices", [c.index for c in r.choices] == [0, 1], r.choices)
    check("echo", r.choices[0].text.startswith("The capital of France is"), r.choices)
    check("echo second prompt", r.choices[1].text.startswith("Once upon a time"), r.choices)
    lp = r.choices[0].logprobs
    check("completion logprobs tokens", len(lp.tokens) == 5 + 2 and lp.token_logprobs[0] is None, lp)
    check("completion logprobs values", all(x <= 0 for x in lp.token_logprobs[5:]), lp)
    check("completion top_logprobs", all(len(t) >= 1 for t in lp.top_logprobs[5:]), lp)
    ids = client.completions.create(
        model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=2, temperature=0
    )
    check(
        "token id prompt",
        "The capital of France is" + ids.choices[0].text == r.choices[0].text,
        (ids.choices[0].text, r.choices[0].text),
    )


def stop_strings():
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."]
    )
    c = r.choices[0]
    check("stop string cut", c.text == " Paris" and c.finish_reason == "stop", c)
    check("stop_reason is the string", (c.model_extra or {}).get("stop_reason") == ".", c)


def vllm_extras():
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        extra_body={"return_token_ids": True, "top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    extra = r.model_extra or {}
    check("prompt_token_ids", isinstance(extra.get("prompt_token_ids"), list), extra)
    ids = (r.choices[0].model_extra or {}).get("token_ids")
    check("choice token_ids", isinstance(ids, list) and len(ids) == 3, r.choices[0])


def model_card():
    card = client.models.retrieve(MODEL)
    check("models retrieve", card.id == MODEL and card.object == "model", card)
    try:
        client.models.retrieve("no-such-model")
        check("unknown model card refused", False)
    except openai.NotFoundError as e:
        check("unknown model card is 404", e.status_code == 404, e)


def errors():
    try:
        OpenAI(base_url=URL, api_key="wrong", max_retries=0).models.list()
        check("wrong key refused", False)
    except openai.AuthenticationError as e:
        check("wrong key is 401", e.status_code == 401, e)
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=1)
        check("unknown model refused", False)
    except openai.NotFoundError as e:
        check("unknown model is 404", e.status_code == 404, e)
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=-1)
        check("negative temperature refused", False)
    except openai.BadRequestError as e:
        check("negative temperature is 400", e.status_code == 400 and e.body.get("param") == "temperature", e.body)
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={"echo": True})
        check("a field not honoured is refused", False)
    except openai.BadRequestError as e:
        check("a field not honoured is a 400 naming it", e.body.get("param") == "echo", e.body)


models()
model_card()
text = chat()
chat_stream(text)
chat_n2_and_logprobs()
seed_reproducible()
completions()
completions_variants()
stop_strings()
vllm_extras()
errors()
print("all checks passed")
