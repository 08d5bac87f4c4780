"""Drives the gRPC front of a running `sluice serve` with real clients: Triton's
`tritonclient.grpc` (health, metadata, repository index, unary infer, stream infer with
`start_stream` / `async_stream_infer`, cancelling a stream) and grpcio's health client
(`grpc_health.v1`). The greedy text over gRPC must equal `/v1/completions`' for the same
prompt.

Run by tests/api_grpc.rs with SLUICE_URL, SLUICE_MODEL and SLUICE_API_KEY set; exits non-zero on
the first failed check. Its last act is to exit mid-stream (printing `DISCONNECTED` first),
leaving the test to check that the server freed that request.
"""

import json
import os
import queue
import sys
import time
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

URL = os.environ["SLUICE_URL"]
MODEL = os.environ["SLUICE_MODEL"]
KEY = os.environ["SLUICE_API_KEY"]
TARGET = URL.removeprefix("http://")
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"
MAX_TOKENS = 8


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


def expect_error(code, fn, *args, contains="", **kwargs):
    try:
        fn(*args, **kwargs)
    except InferenceServerException as e:
        check(e.status() == f"StatusCode.{code}", f"{code} expected, got {e.status()}: {e}")
        check(contains in e.message(), f"`{contains}` in {e.message()!r}")
        return e
    check(False, f"{code} expected, the call succeeded")


def text_input(*prompts):
    t = triton.InferInput("text_input", [len(prompts)], "BYTES")
    t.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
    return t


def texts(result):
    return [x.decode() for x in result.as_numpy("text_output").reshape(-1)]


def http_completion(prompt):
    body = json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"{URL}/v1/completions",
        data=body,
        headers={"content-type": "application/json", **AUTH},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)["choices"][0]["text"]


client = triton.InferenceServerClient(TARGET)

# Health and metadata.
check(client.is_server_live(headers=AUTH), "server live")
check(client.is_server_ready(headers=AUTH), "server ready")
check(client.is_model_ready(MODEL, headers=AUTH), "model ready")
check(not client.is_model_ready("no-such-model", headers=AUTH), "unknown model not ready")
meta = client.get_server_metadata(headers=AUTH, as_json=True)
check(meta["name"] == "sluice", f"server metadata {meta}")
mm = client.get_model_metadata(MODEL, headers=AUTH, as_json=True)
check(mm["name"] == MODEL, f"model metadata {mm}")
check(any(i["name"] == "text_input" and i["datatype"] == "BYTES" for i in mm["inputs"]), str(mm))
check(any(o["name"] == "text_output" for o in mm["outputs"]), str(mm))
expect_error("NOT_FOUND", client.get_model_metadata, "no-such-model", headers=AUTH)
index = client.get_model_repository_index(headers=AUTH, as_json=True)
check([m["name"] for m in index["models"]] == [MODEL], f"repository index {index}")
check(index["models"][0]["state"] == "READY", f"repository index {index}")
# The repository's load and unload are the registry's, behind the admin key only.
ADMIN = {"authorization": f"Bearer {os.environ['SLUICE_ADMIN_KEY']}"}
expect_error("UNAUTHENTICATED", client.load_model, MODEL, headers=AUTH)
expect_error("UNAUTHENTICATED", client.unload_model, MODEL, headers=AUTH)
client.unload_model(MODEL, headers=ADMIN)
index = client.get_model_repository_index(headers=AUTH, as_json=True)
check(index["models"][0]["state"] != "READY", f"index after unload {index}")
check(not client.is_model_ready(MODEL, headers=AUTH), "ready after unload")
expect_error("NOT_FOUND", client.infer, MODEL, [text_input(PROMPT)], headers=AUTH, contains="not loaded")
client.load_model(MODEL, headers=ADMIN)
check(client.is_model_ready(MODEL, headers=AUTH), "ready after load")
check(client.is_model_ready(MODEL, "1", headers=AUTH), "version 1 ready after load")
# Options the repository does not honour are refused by name, never ignored.
expect_error("INVALID_ARGUMENT", client.load_model, MODEL, headers=ADMIN, config="{}", contains="config")
expect_error("NOT_FOUND", client.get_model_metadata, MODEL, "9", headers=AUTH)
check(client.get_model_metadata(MODEL, "1", headers=AUTH, as_json=True)["versions"] == ["1"], "metadata of version 1")
print("metadata ok")

# The API key applies to the inference service, not to health.
expect_error("UNAUTHENTICATED", client.is_server_live, contains="API key")
expect_error("UNAUTHENTICATED", client.get_server_metadata, headers={"authorization": "Bearer no"})
channel = grpc.insecure_channel(TARGET)
health = health_pb2_grpc.HealthStub(channel)
for service in ["", "inference.GRPCInferenceService"]:
    r = health.Check(health_pb2.HealthCheckRequest(service=service))
    check(r.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {r}")
try:
    health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    check(False, "an unknown service's health is NOT_FOUND")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.NOT_FOUND, f"unknown service: {e.code()}")
watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
first = next(watch)
check(first.status == health_pb2.HealthCheckResponse.SERVING, f"watch: {first}")
watch.cancel()
print("health ok")

# Unary inference: greedy text equals /v1/completions'.
params = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
r = client.infer(MODEL, [text_input(PROMPT)], parameters=params, request_id="u1", headers=AUTH)
unary = texts(r)
response = r.get_response()
check(response.id == "u1", f"request id echoed: {response.id!r}")
check(response.parameters["completion_tokens"].int64_param == MAX_TOKENS, str(response.parameters))
check(response.parameters["finish_reason"].string_param == "length", str(response.parameters))
http = http_completion(PROMPT)
check(unary == [http], f"gRPC {unary!r} != /v1/completions {http!r}")
print(f"unary ok: {unary[0]!r}")

# Two prompts in one request; options as input tensors.
mt = triton.InferInput("max_tokens", [1], "INT32")
mt.set_data_from_numpy(np.array([MAX_TOKENS], dtype=np.int32))
temp = triton.InferInput("temperature", [1], "FP32")
temp.set_data_from_numpy(np.array([0.0], dtype=np.float32))
r = client.infer(MODEL, [text_input(PROMPT, "Once upon a time"), mt, temp], headers=AUTH)
both = texts(r)
check(len(both) == 2 and both[0] == http, f"two prompts: {both!r}")

# Errors are statuses naming the field.
expect_error("INVALID_ARGUMENT", client.infer, MODEL, [text_input(PROMPT)],
             parameters={"top_p": 5.0}, headers=AUTH, contains="top_p")
expect_error("INVALID_ARGUMENT", client.infer, MODEL, [text_input(PROMPT)],
             parameters={"beam_width": 2}, headers=AUTH, contains="beam_width")
expect_error("INVALID_ARGUMENT", client.infer, MODEL, [mt], headers=AUTH, contains="text_input")
expect_error("NOT_FOUND", client.infer, "no-such-model", [text_input(PROMPT)], headers=AUTH)
print("errors ok")

# Streaming: one response per token group, the last flagged final; the text is the unary one.
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=AUTH)
client.async_stream_infer(MODEL, [text_input(PROMPT)], request_id="s1",
                          parameters={"stream": True, **params},
                          enable_empty_final_response=True)
client.async_stream_infer(MODEL, [text_input(PROMPT)], request_id="bad",
                          parameters={"stream": True, "temperature": -1.0})
streamed, finals, n_token_responses, got_error = "", 0, 0, False
while finals < 1 or not got_error:
    result, error = responses.get(timeout=120)
    if error is not None:
        check("temperature" in str(error) and "InvalidArgument" in str(error), f"stream error {error}")
        got_error = True
        continue
    resp = result.get_response()
    check(resp.id == "s1", f"stream id {resp.id!r}")
    if resp.parameters["triton_final_response"].bool_param:
        finals += 1
        check(resp.parameters["completion_tokens"].int64_param == MAX_TOKENS, str(resp.parameters))
    else:
        n_token_responses += 1
        streamed += "".join(texts(result))
check(streamed == unary[0], f"streamed {streamed!r} != unary {unary[0]!r}")
check(n_token_responses >= 2, f"{n_token_responses} token responses")
# Without `stream`, ModelStreamInfer answers each request once, whole.
client.async_stream_infer(MODEL, [text_input(PROMPT)], request_id="w1", parameters=params)
result, error = responses.get(timeout=120)
check(error is None and texts(result) == unary, f"whole over the stream: {error} {result}")
client.stop_stream()
print(f"stream ok: {n_token_responses} token responses")

def running():
    with urllib.request.urlopen(f"{URL}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("sluice:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def long_stream(request_id):
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        headers=AUTH)
    client.async_stream_infer(MODEL, [text_input("Write a long story about a dragon.")],
                              request_id=request_id,
                              parameters={"stream": True, "max_tokens": 400, "ignore_eos": True})
    for _ in range(3):
        result, error = responses.get(timeout=120)
        check(error is None, f"mid-stream: {error}")
    check(running() == 1.0, "the request runs")


# Cancel mid-stream: the request leaves the engine within moments (a step is milliseconds).
long_stream("c1")
client.stop_stream(cancel_requests=True)
start = time.monotonic()
while running() > 0:
    check(time.monotonic() - start < 5, "the cancelled request still runs after 5 s")
    time.sleep(0.01)
print(f"CANCELLED: freed within {time.monotonic() - start:.3f} s")

# A client that dies mid-stream: the test checks its request is freed too.
long_stream("d1")
print("DISCONNECTED", flush=True)
os._exit(0)
