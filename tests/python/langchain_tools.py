"""Tool calls and structured output with `langchain-openai` against `sluice serve`:
`bind_tools` with the tool forced (an `AIMessage` whose `tool_calls` hold valid arguments),
`auto` (well-formed either way), streamed chunks added up into the same call, the tool's
result sent back, and `with_structured_output` by `json_schema` (a pydantic model) and by
`json_mode` (a JSON object).

Run by tests/tools.rs in its own venv, with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set.
"""

import os
import sys

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

llm = ChatOpenAI(
    base_url=os.environ["SLUICE_URL"] + "/v1",
    api_key=os.environ["SLUICE_API_KEY"],
    model=os.environ["SLUICE_MODEL"],
    temperature=0,
    max_tokens=60,
    max_retries=0,
    timeout=300,
)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


@tool
def get_time(zone: str) -> str:
    """The time now in a time zone (utc, cet or pst)."""
    return "12:00"


QUESTION = [HumanMessage("What time is it in utc?")]

# `strict`: LangChain closes the schema (no additional properties), so the args are exact.
forced = llm.bind_tools([get_time], tool_choice="get_time", strict=True)
msg = forced.invoke(QUESTION)
calls = msg.tool_calls
check("forced tool_calls", len(calls) == 1 and calls[0]["name"] == "get_time", msg)
check("forced args", set(calls[0]["args"]) == {"zone"} and isinstance(calls[0]["args"]["zone"], str), calls)
check("forced id", calls[0]["id"].startswith("call_"), calls)
check("forced no invalid calls", not msg.invalid_tool_calls, msg.invalid_tool_calls)

# One call at most: a small model under an open list may repeat calls to max_tokens.
required = llm.bind_tools([get_time], tool_choice="required", parallel_tool_calls=False)
# Not strict: the schema allows more properties than `zone`; the grammar keeps `zone` a string.
loose = required.invoke(QUESTION).tool_calls
check("required tool_calls", len(loose) >= 1 and all(isinstance(c["args"].get("zone"), str) for c in loose), loose)

chunks = list(forced.stream(QUESTION))
total = chunks[0]
for c in chunks[1:]:
    total = total + c
streamed = [(c["name"], c["args"]) for c in total.tool_calls]
check("streamed call equals the greedy one", streamed == [(c["name"], c["args"]) for c in calls], (streamed, calls))

auto = llm.bind_tools([get_time]).invoke(QUESTION)
check(
    "auto well-formed",
    all(c["name"] == "get_time" and isinstance(c["args"], dict) for c in auto.tool_calls) and not auto.invalid_tool_calls,
    auto,
)

answer = llm.bind_tools([get_time]).invoke(
    QUESTION + [msg, ToolMessage(content="12:00", tool_call_id=calls[0]["id"])]
)
check("answer after the tool result", answer.content is not None, answer)


class Time(BaseModel):
    zone: str
    hour: int


ask = "What time is it in utc? Answer with the zone and the hour."
parsed = llm.with_structured_output(Time, method="json_schema", strict=True).invoke(ask)
check("with_structured_output json_schema", isinstance(parsed, Time), parsed)
as_json = llm.with_structured_output(None, method="json_mode").invoke(
    "Reply with a JSON object with keys zone and hour: " + ask
)
check("with_structured_output json_mode", isinstance(as_json, dict), as_json)
print("all langchain checks passed")
