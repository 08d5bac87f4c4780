"""Writes the two workloads of scripts/bench_speculative.sh as `sluice bench serve --workload
jsonl` datasets, from files of this repository (no download):

- grounded.jsonl: work whose answer repeats its input, the traffic where prompt-lookup drafts
  pay: edit a given code file, answer with quotes from a given text, extract JSON from a
  document (one third each);
- free.jsonl: a story from a one-line prompt, where the answer rarely repeats the prompt.
"""

import json
import pathlib
import random
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
out = pathlib.Path(sys.argv[1])
count = int(sys.argv[2]) if len(sys.argv) > 2 else 24
rng = random.Random(25)


def snippets(pattern, lines):
    """Windows of `lines` lines from the files matching `pattern`, starting at blank lines."""
    found = []
    for path in sorted(ROOT.glob(pattern)):
        text = path.read_text().splitlines()
        starts = [i + 1 for i, l in enumerate(text) if not l.strip()]
        for s in starts[::6]:
            window = "\n".join(text[s : s + lines]).strip()
            if len(window) > 600:
                found.append(window)
    rng.shuffle(found)
    return found


code = snippets("src/**/*.rs", 30)
prose = snippets("docs/*.md", 14)


def chat(content, max_tokens):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


grounded = []
for i in range(count):
    kind = i % 3
    if kind == 0:
        src = code[i]
        names = re.findall(r"\blet (?:mut )?([a-z_][a-z0-9_]{2,})", src) or ["self"]
        name = names[0]
        grounded.append(chat(
            f"Here is some Rust code:\n\n```rust\n{src}\n```\n\nRewrite the code above with "
            f"the variable `{name}` renamed to `{name}_v2`. Output the whole code.", 256))
    elif kind == 1:
        text = prose[i]
        word = max(re.findall(r"[A-Za-z]{6,}", text) or ["the"], key=len)
        grounded.append(chat(
            f"Text:\n\n{text}\n\nQuote, word for word, every sentence of the text that "
            f"mentions \"{word}\".", 192))
    else:
        text = prose[i]
        grounded.append(chat(
            f"Document:\n\n{text}\n\nExtract a JSON object with the keys \"first_sentence\", "
            "\"last_sentence\" and \"terms\" (the terms in backquotes), copying the text "
            "exactly. Output only the JSON.", 256))

subjects = ["a lighthouse keeper", "a clockmaker's cat", "two rival bakers", "a lost robot",
            "a girl who maps rivers", "an old ship's cook", "a village without music",
            "a fox who collects keys"]
free = [chat(f"Write a short story about {subjects[i % len(subjects)]}.", 200)
        for i in range(count)]

out.mkdir(parents=True, exist_ok=True)
for name, rows in [("grounded", grounded), ("free", free)]:
    with open(out / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
print(f"{out}/grounded.jsonl, {out}/free.jsonl: {count} prompts each")
