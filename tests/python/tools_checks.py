"""Tool calls with the official `openai` package against `sluice serve`: forced calls whose
arguments validate, the SDK's stream helper accumulating the streamed deltas into the same
call as a non-streamed greedy request, `auto` well-formed, and a conversation that sends
the call and its result back.

Run by tests/tools.rs with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set; exits non-zero
on the first failed check.
"""

import json
import os
import sys

from openai import OpenAI

URL = os.environ["SLUICE_URL"] + "/v1"
MODEL = os.environ["SLUICE_MODEL"]
KEY = os.environ["SLUICE_API_KEY"]

client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=300)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# `strict`: the SDK's stream helper parses only strict tools' arguments.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time now in a time zone",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["utc", "cet", "pst"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def valid_args(name, args):
    if name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 20 and args["unit"] in ("c", "f")
    if name == "get_time":
        return set(args) == {"zone"} and args["zone"] in ("utc", "cet", "pst")
    return False


def forced(tool_choice):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, temperature=0
    )
    c = r.choices[0]
    check(f"{tool_choice} finish_reason", c.finish_reason == "tool_calls", c)
    calls = c.message.tool_calls or []
    check(f"{tool_choice} calls", len(calls) >= 1 and c.message.content is None, c.message)
    for call in calls:
        args = json.loads(call.function.arguments)
        check(f"{tool_choice} id", call.id.startswith("call_") and call.type == "function", call)
        check(f"{tool_choice} arguments valid", valid_args(call.function.name, args), call)
    return r


def streamed_matches(expected):
    with client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    check("stream events", "tool_calls.function.arguments.done" in kinds, kinds)
    check("arguments streamed in fragments", kinds.count("tool_calls.function.arguments.delta") > 3, kinds)
    c = final.choices[0]
    check("stream finish_reason", c.finish_reason == "tool_calls", c)
    got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
    want = [(t.function.name, json.loads(t.function.arguments)) for t in expected.choices[0].message.tool_calls]
    check("stream accumulates the greedy call", got == want, (got, want))
    parsed = [t.function.parsed_arguments for t in c.message.tool_calls]
    check("stream parsed arguments", [p for _, p in got] == parsed, parsed)


def auto():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=40, temperature=0)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        check("auto calls", all(valid_args(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls), c)
    else:
        check("auto content", isinstance(c.message.content, str) and not c.message.tool_calls, c)


def conversation(first):
    call = first.choices[0].message.tool_calls[0]
    messages = MESSAGES + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    c = r.choices[0]
    check("conversation answer", isinstance(c.message.content, str) and len(c.message.content) > 0, c)


first = forced("required")
forced({"type": "function", "function": {"name": "get_time"}})
streamed_matches(first)
auto()
conversation(first)
print("all tool checks passed")
