"""Structured outputs through the official `openai` package, as users' code would write them.

Run by tests/structured.rs with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set; exits non-zero
on the first failed check. Schemas are bounded so that greedy outputs complete in few tokens.
"""

import json
import os
import sys
from typing import List, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

URL = os.environ["SLUICE_URL"] + "/v1"
MODEL = os.environ["SLUICE_MODEL"]
KEY = os.environ["SLUICE_API_KEY"]

client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=300)
MESSAGES = [{"role": "user", "content": "Describe a fictional painter."}]


class Painter(BaseModel):
    name: str = Field(max_length=16)
    born: int = Field(ge=1400, le=2000)
    colours: List[Literal["red", "green", "blue"]] = Field(max_length=2)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def parse_with_pydantic():
    r = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Painter, max_tokens=80, temperature=0
    )
    c = r.choices[0]
    check("parse finish_reason", c.finish_reason == "stop", c)
    check("parse parsed", isinstance(c.message.parsed, Painter), c.message)
    check("parse bounds", 1400 <= c.message.parsed.born <= 2000, c.message.parsed)


def json_schema_create():
    schema = Painter.model_json_schema()
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=80,
        temperature=0.8,
        seed=5,
        n=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "painter", "schema": schema, "strict": True},
        },
    )
    for c in r.choices:
        check("json_schema finish_reason", c.finish_reason == "stop", c)
        Painter.model_validate_json(c.message.content)
    check("json_schema n=2 valid", len(r.choices) == 2)


def json_object_streamed():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
    )
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    if finish == "stop":
        check("json_object streamed", isinstance(json.loads(text), dict), text)
    else:
        check("json_object cut only by length", finish == "length", finish)


def structured_outputs_choice():
    r = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        temperature=0,
        extra_body={"structured_outputs": {"choice": [" yes", " no"]}},
    )
    check("choice", r.choices[0].text in (" yes", " no"), r.choices[0].text)


def bad_schema_is_400():
    try:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "objekt"}},
            },
        )
    except openai.BadRequestError as e:
        check("bad schema 400", e.status_code == 400, e)
        check("bad schema param", e.param == "response_format", e.body)
        return
    check("bad schema refused", False, "a 200")


parse_with_pydantic()
json_schema_create()
json_object_streamed()
structured_outputs_choice()
bad_schema_is_400()
print("all checks passed")
