"""The Files and Batch APIs through the official `openai` SDK, unchanged: upload, create,
retrieve until done, read the output, list, cancel; files paged
with `after`/`limit`/`order`/`purpose`. Answers must equal the online ones."""
import io
import json
import os
import time

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["SLUICE_URL"] + "/v1", api_key=os.environ["SLUICE_API_KEY"])
model = os.environ["SLUICE_MODEL"]


def body(topic):
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write about {topic}."}],
        "max_tokens": 8,
        "temperature": 0,
    }


topics = ["tea", "snow", "maps"]
lines = [
    json.dumps({"custom_id": t, "method": "POST", "url": "/v1/chat/completions", "body": body(t)})
    for t in topics
]
f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
assert f.purpose == "batch" and f.bytes > 0, f
assert client.files.retrieve(f.id).id == f.id
batch = client.batches.create(
    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
)
deadline = time.time() + 60
while batch.status not in ("completed", "failed", "cancelled", "expired"):
    assert time.time() < deadline, batch
    time.sleep(0.1)
    batch = client.batches.retrieve(batch.id)
assert batch.status == "completed", batch
assert batch.request_counts.total == 3 and batch.request_counts.completed == 3, batch
records = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
assert sorted(r["custom_id"] for r in records) == sorted(topics), records
for r in records:
    online = client.chat.completions.create(**body(r["custom_id"]))
    got = r["response"]["body"]["choices"][0]["message"]["content"]
    assert got == online.choices[0].message.content, (got, online)
listed = client.batches.list(limit=10)
assert any(b.id == batch.id for b in listed.data), listed
try:
    client.batches.list(after="batch_nope")
except openai.BadRequestError as e:
    assert e.body["param"] == "after", e.body
else:
    raise AssertionError("an unknown batch cursor was accepted")
cancelled = client.batches.cancel(batch.id)
assert cancelled.status == "completed", cancelled  # a finished batch stays finished

# Files paging, as the SDK's SyncCursorPage drives it: `after` is the last id of a page.
uploaded = [
    client.files.create(file=(f"p{i}.jsonl", io.BytesIO(lines[0].encode())), purpose="batch").id
    for i in range(5)
]
everything = [x.id for x in client.files.list()]  # default: newest first, one page
assert everything[:5] == uploaded[::-1], (everything, uploaded)
page = client.files.list(limit=2)
assert [x.id for x in page.data] == everything[:2] and page.has_more, page
paged = [x.id for x in client.files.list(limit=2)]  # auto-paging follows `after`
assert paged == everything, (paged, everything)
assert [x.id for x in client.files.list(limit=3, order="asc")] == everything[::-1]
second = client.files.list(limit=2, after=page.data[-1].id)
assert [x.id for x in second.data] == everything[2:4], second
last = client.files.list(limit=len(everything), after=everything[0], order="asc")
assert last.data == [] and not last.has_more, last
batch_files = [x.id for x in client.files.list(purpose="batch")]
assert batch_files == [i for i in everything if i in set(uploaded) | {f.id}], batch_files
for bad in ({"bogus": "1"}, {"limit": "0"}, {"limit": "10001"}, {"order": "up"}, {"after": "file-nope"}):
    try:
        client.files.list(extra_query=bad)
    except openai.BadRequestError as e:
        assert e.body["param"] == next(iter(bad)), (bad, e.body)
    else:
        raise AssertionError(f"{bad} was accepted")
client.files.delete(f.id)
print("batch checks passed")
