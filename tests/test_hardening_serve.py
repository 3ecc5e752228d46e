"""`modelseal serve` under attack (issue 14, items 6, 7, 11, 12), against a real server process with
tritonclient and raw HTTP/gRPC: every malformed request is a 4xx / INVALID_ARGUMENT, a byte budget bounds
request bodies in flight, JSON responses are strict JSON, the dynamic batcher survives mixed traffic, a
config that disagrees with its model is refused at load with the reason, a busy port is one line."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .services import free_port, wait_for
from .serving import ServeProcess

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

pytest.importorskip("tritonclient.grpc")
onnx = pytest.importorskip("onnx")

BATCHED = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ {{ name: "x" data_type: {dtype} dims: [ {dims} ] }} ]
output [ {{ name: "double" data_type: TYPE_FP32 dims: [ 4 ] }}, {{ name: "neg" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
{extra}
"""
INTS = """name: "ints"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "i" data_type: TYPE_INT8 dims: [ 2 ] } ]
output [ { name: "o" data_type: TYPE_INT8 dims: [ 2 ] } ]
"""


def two_outputs_model() -> bytes:
    """x [batch, 4] FP32 -> double = x + x, neg = -x."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["double"]), helper.make_node("Neg", ["x"], ["neg"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("double", "neg")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


def int8_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["i"], ["o"])], "ints",
        [helper.make_tensor_value_info("i", TensorProto.INT8, [2])],
        [helper.make_tensor_value_info("o", TensorProto.INT8, [2])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


def add(repo: Path, name: str, config: str | None, model: bytes | None) -> None:
    (repo / name / "1").mkdir(parents=True)
    if model is not None:
        (repo / name / "1" / "model.onnx").write_bytes(model)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)


def batched(name: str, dtype: str = "TYPE_FP32", dims: str = "4", extra: str = "") -> str:
    return BATCHED.format(name=name, dtype=dtype, dims=dims, extra=extra)


# models whose config disagrees with the model, or cannot be used at all: (name, config, reason expected)
MISMATCHED = [
    ("bad_dtype", batched("bad_dtype", dtype="TYPE_FP64"), "input 'x' is FP64 in the config but FP32 in the model"),
    ("bad_dims", batched("bad_dims", dims="5"), "input 'x' has shape [-1, 5] in the config but [-1, 4] in the model"),
    ("bad_name", batched("bad_name").replace('name: "x"', 'name: "input"'), "config input(s) ['input'] are not in"),
    ("bad_output", batched("bad_output").replace('"neg"', '"logits"'), "config output(s) ['logits'] are not in"),
    ("bad_rank", batched("bad_rank", dims="2, 2"), "has shape [-1, 2, 2] in the config but [-1, 4] in the model"),
    ("bad_string", batched("bad_string", dtype="TYPE_STRING"), "input 'x' is BYTES in the config but FP32 in the"),
]
UNUSABLE = [
    ("bad_type", batched("bad_type", dtype="TYPE_INVALID"), "data type TYPE_INVALID is not supported"),
]
# configs that leave out what the model itself tells: completed at load, as Triton does (--strict-config refuses)
COMPLETED = [
    ("no_inputs", batched("no_inputs").replace('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', "")),
    ("no_config", None),
]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("hardening-serve")
    repo = tmp / "repo"
    model = two_outputs_model()
    add(repo, "two", batched("two", extra="dynamic_batching { max_queue_delay_microseconds: 5000 }"), model)
    add(repo, "ints", INTS, int8_model())
    for name, config, _ in MISMATCHED + UNUSABLE:
        add(repo, name, config, model)
    for name, config in COMPLETED:
        add(repo, name, config, model)
    server = ServeProcess(
        repo, tmp / "serve.log", extra=["--max-body-mb", "4", "--max-inflight-mb", "8", "--body-timeout", "4"]
    )
    try:
        yield {"server": server, "tmp": tmp, "repo": repo}
    finally:
        server.stop()


@functools.cache
def _client(address: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://{address}", timeout=30)


def post(server: ServeProcess, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return _client(server.http).post(path, content=body, headers=headers)


def tensor_json(**override: Any) -> dict[str, Any]:
    item = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    return {"inputs": [{**item, **override}]}


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


# REST requests to model "two" (or "ints") that must each get a 400, by the part of the request they break
REST_CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("deep nesting", "two", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
    ("deep nesting in data", "two", j(tensor_json(data=json.loads("[" * 50 + "1" + "]" * 50))), {}),
    ("not JSON", "two", b"{not json", {}),
    ("not UTF-8", "two", b'{"inputs": "\xff"}', {}),
    ("JSON array", "two", b"[1, 2]", {}),
    ("bare NaN (not JSON)", "two", j(tensor_json())[:-4] + b', "data": [NaN, 1, 2, 3]}]}', {}),
    ("duplicate key", "two", j(tensor_json())[:-2] + b', "name": "y"}]}', {}),
    ("huge integer literal", "two", j(tensor_json())[:-2] + b', "x": ' + b"9" * 5000 + b"}]}", {}),
    ("id not a string", "two", j({**tensor_json(), "id": {"a": 1}}), {}),
    ("parameters a list", "two", j({**tensor_json(), "parameters": [1]}), {}),
    ("binary_data_output a string", "two", j({**tensor_json(), "parameters": {"binary_data_output": "yes"}}), {}),
    ("inputs missing", "two", b"{}", {}),
    ("inputs an object", "two", j({"inputs": {"x": 1}}), {}),
    ("input a number", "two", j({"inputs": [1]}), {}),
    ("name missing", "two", j({"inputs": [{"shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}), {}),
    ("name a number", "two", j(tensor_json(name=5)), {}),
    ("shape missing", "two", j(tensor_json(shape=None)), {}),
    ("shape a string", "two", j(tensor_json(shape="1,4")), {}),
    ("shape of floats", "two", j(tensor_json(shape=[1.0, 4])), {}),
    ("shape of booleans", "two", j(tensor_json(shape=[True, 4])), {}),
    ("negative dim", "two", j(tensor_json(shape=[-1, 4])), {}),
    ("huge dims", "two", j(tensor_json(shape=[2**62, 2**62, 2**62])), {}),
    ("dims past int64", "two", j(tensor_json(shape=[10**30, 4])), {}),
    ("rank 40", "two", j(tensor_json(shape=[1] * 40)), {}),
    ("datatype missing", "two", j(tensor_json(datatype=None)), {}),
    ("datatype a number", "two", j(tensor_json(datatype=11)), {}),
    ("datatype unknown", "two", j(tensor_json(datatype="FP99")), {}),
    ("datatype BYTES", "two", j(tensor_json(datatype="BYTES", data=["a", "b", "c", "d"])), {}),
    ("datatype disagrees with the model", "two", j(tensor_json(datatype="FP64")), {}),
    ("input parameters a list", "two", j(tensor_json(parameters=[1])), {}),
    ("data missing", "two", j({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}), {}),
    ("data an object", "two", j(tensor_json(data={"a": 1})), {}),
    ("data a string", "two", j(tensor_json(data="abcd")), {}),
    ("data ragged", "two", j(tensor_json(data=[[1, 2], [3]])), {}),
    ("data of objects", "two", j(tensor_json(data=[{}, {}, {}, {}])), {}),
    ("too few values", "two", j(tensor_json(data=[1.0])), {}),
    ("int8 overflow", "ints", j({"inputs": [{"name": "i", "shape": [2], "datatype": "INT8", "data": [1000, 1]}]}), {}),
    ("int8 past int64", "ints", j({"inputs": [{"name": "i", "shape": [2], "datatype": "INT8", "data": [2**70, 1]}]}),
     {}),
    ("shape disagrees with the model", "two", j(tensor_json(shape=[1, 2, 2])), {}),
    ("batch of 0", "two", j(tensor_json(shape=[0, 4], data=[])), {}),
    ("batch over max_batch_size", "two", j(tensor_json(shape=[5, 4], data=[0.0] * 20)), {}),
    ("input given twice", "two", j({"inputs": tensor_json()["inputs"] * 2}), {}),
    ("unknown input", "two", j({"inputs": [*tensor_json()["inputs"], {**tensor_json()["inputs"][0], "name": "y"}]}),
     {}),
    ("outputs a number", "two", j({**tensor_json(), "outputs": 5}), {}),
    ("output a string", "two", j({**tensor_json(), "outputs": ["double"]}), {}),
    ("output name a number", "two", j({**tensor_json(), "outputs": [{"name": 5}]}), {}),
    ("output parameters a list", "two", j({**tensor_json(), "outputs": [{"name": "double", "parameters": [1]}]}), {}),
    ("binary_data a string", "two",
     j({**tensor_json(), "outputs": [{"name": "double", "parameters": {"binary_data": "x"}}]}), {}),
    ("output named twice", "two", j({**tensor_json(), "outputs": [{"name": "double"}, {"name": "double"}]}), {}),
    ("unknown output", "two", j({**tensor_json(), "outputs": [{"name": "logits"}]}), {}),
    ("header length not a number", "two", j(tensor_json()), {"Inference-Header-Content-Length": "abc"}),
    ("header length negative", "two", j(tensor_json()), {"Inference-Header-Content-Length": "-1"}),
    ("header length past the body", "two", j(tensor_json()), {"Inference-Header-Content-Length": "99999"}),
]  # fmt: skip


def binary_case(size: Any, extra: bytes = b"", shape: list[int] | None = None) -> tuple[bytes, dict[str, str]]:
    header = j({"inputs": [{"name": "x", "shape": shape or [1, 4], "datatype": "FP32",
                            "parameters": {"binary_data_size": size}}]})  # fmt: skip
    return header + np.ones(4, np.float32).tobytes() + extra, {"Inference-Header-Content-Length": str(len(header))}


REST_CASES += [
    ("binary size a string", "two", *binary_case("16")),
    ("binary size a boolean", "two", *binary_case(True)),
    ("binary size negative", "two", *binary_case(-16)),
    ("binary size past the data", "two", *binary_case(2**40)),
    ("binary size not the shape's", "two", *binary_case(12)),
    ("binary data for a huge shape", "two", *binary_case(16, shape=[2**31 - 1, 2**31 - 1, 4])),
    ("binary bytes left over", "two", *binary_case(16, extra=b"\0" * 8)),
]


def test_every_malformed_rest_request_is_a_400(served: dict[str, Any]) -> None:
    """Type confusion in every field, deep nesting, wrong shapes/dtypes, binary-size mismatches, missing
    fields, huge and negative dims: each a 400 with a JSON reason (ac0b701: 500s), and the server serves on."""
    server = served["server"]
    wrong = {}
    for what, model, body, headers in REST_CASES:
        r = post(server, f"/v2/models/{model}/infer", body, headers)
        if r.status_code != 400 or not r.json().get("error"):
            wrong[what] = (r.status_code, r.text[:200])
    assert wrong == {}, wrong
    for body in (b"[" * 100_000, b'{"ready": "yes"}', b"[1]"):
        assert post(server, "/v2/repository/index", body).status_code == 400
    client = server.http_client()
    result = client.infer("two", [_http_input(np.ones((1, 4), np.float32))])
    np.testing.assert_array_equal(result.as_numpy("double"), np.full((1, 4), 2, np.float32))


def _http_input(x: np.ndarray, binary: bool = True) -> Any:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def grpc_cases() -> list[tuple[str, Any]]:
    """Malformed ModelInferRequests, built with tritonclient's own protobuf messages."""
    from tritonclient.grpc import service_pb2 as pb

    def request(model: str = "two", **tensor: Any) -> Any:
        r = pb.ModelInferRequest(model_name=model)
        fields = {"name": "x", "datatype": "FP32", "shape": [1, 4], **tensor}
        raw = fields.pop("raw", np.ones(4, np.float32).tobytes())
        contents = fields.pop("contents", None)
        r.inputs.add(**fields)
        if contents is not None:
            r.inputs[0].contents.CopyFrom(pb.InferTensorContents(**contents))
        if raw is not None:
            r.raw_input_contents.append(raw)
        return r

    two_raw = request()
    two_raw.raw_input_contents.append(b"\0" * 16)
    twice = request()
    twice.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    twice.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    outputs_twice = request()
    outputs_twice.outputs.add(name="double")
    outputs_twice.outputs.add(name="double")
    return [
        ("no inputs", pb.ModelInferRequest(model_name="two")),
        ("unknown datatype", request(datatype="FP99")),
        ("BYTES", request(datatype="BYTES")),
        ("empty name", request(name="")),
        ("negative dim", request(shape=[-1, 4])),
        ("huge dims", request(shape=[2**62, 2**62, 2**62])),
        ("huge dims, no data", request(shape=[2**62, 2**62], raw=b"")),
        ("rank 40", request(shape=[1] * 40)),
        ("raw size not the shape's", request(raw=b"\0" * 12)),
        ("more raw contents than inputs", two_raw),
        ("raw and typed contents", request(contents={"fp32_contents": [1, 2, 3, 4]})),
        ("typed contents of another type", request(raw=None, contents={"int_contents": [1, 2, 3, 4]})),
        ("FP16 as typed contents", request(datatype="FP16", raw=None, contents={"fp32_contents": [1, 2, 3, 4]})),
        ("int8 overflow in typed contents",
         request("ints", name="i", datatype="INT8", shape=[2], raw=None, contents={"int_contents": [1000, 1]})),
        ("input given twice", twice),
        ("output named twice", outputs_twice),
        ("datatype disagrees with the model", request(datatype="FP64", raw=np.ones(4, np.float64).tobytes())),
        ("batch over max_batch_size", request(shape=[5, 4], raw=np.ones(20, np.float32).tobytes())),
    ]  # fmt: skip


def test_every_malformed_grpc_request_is_invalid_argument(served: dict[str, Any]) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(served["server"].grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        wrong = {}
        for what, request in grpc_cases():
            try:
                stub.ModelInfer(request, timeout=30)
                wrong[what] = "accepted"
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong[what] = f"{exc.code()}: {exc.details()}"
        assert wrong == {}, wrong


def test_json_responses_are_strict_json_with_nonfinite_values_as_strings(served: dict[str, Any]) -> None:
    """Python's json writes bare NaN/Infinity, which strict parsers (the KServe SDK's orjson) refuse."""
    import tritonclient.http as httpclient

    server = served["server"]
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    header = j({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}],
                "outputs": [{"name": "double", "parameters": {"binary_data": False}}]})  # fmt: skip
    r = post(
        server, "/v2/models/two/infer", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    )

    def refuse(constant: str) -> Any:
        raise AssertionError(f"bare {constant} in the response")

    body = json.loads(r.content, parse_constant=refuse)
    assert body["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 3.0]
    client = server.http_client()
    out = httpclient.InferRequestedOutput("double", binary_data=False)
    result = client.infer("two", [_http_input(x)], outputs=[out]).as_numpy("double")
    np.testing.assert_array_equal(result, x + x)  # tritonclient reads the strings back as floats


def test_request_bytes_in_flight_are_bounded(served: dict[str, Any]) -> None:
    """Two clients that declare 3.5 MiB bodies and send them slowly hold 7 of the 8 MiB budget: a third
    large request is refused at once (429 / RESOURCE_EXHAUSTED) without its body being read, a small valid
    request is still answered, and the slow clients lose their share when the body timeout (4 s) ends."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = served["server"]
    host, port = server.http.split(":")

    def declare(size: int) -> socket.socket:
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(f"POST /v2/models/two/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n{{".encode())
        return s

    slow = [declare(7 * 1024 * 1024 // 2) for _ in range(2)]
    try:
        time.sleep(0.5)  # both requests reached their handlers and were charged
        started = time.monotonic()
        third = declare(3 * 1024 * 1024)
        reply = third.recv(4096).decode(errors="replace")
        third.close()
        assert reply.startswith("HTTP/1.1 429") and "server busy" in reply and "Retry-After" in reply, reply[:300]
        assert time.monotonic() - started < 3
        np.testing.assert_array_equal(
            server.http_client().infer("two", [_http_input(np.ones((1, 4), np.float32))]).as_numpy("neg"),
            -np.ones((1, 4), np.float32),
        )
        big = grpcclient.InferInput("x", [4, 65536], "FP32")  # 1 MiB: more than the budget has left
        big.set_data_from_numpy(np.zeros((4, 65536), np.float32))
        with pytest.raises(InferenceServerException, match="server busy") as refused:
            server.grpc_client().infer("two", [big])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        # the slow senders time out (408) and their share comes back while they are still connected
        body = j(tensor_json(data=[0.0] * 4, pad="x" * (3 * 1024 * 1024)))
        wait_for(lambda: post(server, "/v2/models/two/infer", body).status_code == 200, 15, "the budget to come back")
        assert all(s.recv(4096).startswith(b"HTTP/1.1 408") for s in slow)
    finally:
        for s in slow:
            s.close()
    time.sleep(0.2)
    assert "Traceback" not in (served["tmp"] / "serve.log").read_text()


def _mixed_client(server: ServeProcess, seed: int, requests: int) -> list[str]:
    """One client's requests of 1-3 rows over HTTP or gRPC asking for different outputs; returns problems."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    rng = random.Random(seed)
    http = httpclient.InferenceServerClient(server.http, network_timeout=60.0)  # a hang fails, not blocks
    grpc = server.grpc_client()
    problems = []
    for i in range(requests):
        x = np.random.default_rng(seed * 1000 + i).standard_normal((rng.randint(1, 3), 4)).astype(np.float32)
        names = rng.choice([["double"], ["neg"], ["double", "neg"], []])
        if rng.random() < 0.5:
            result = http.infer("two", [_http_input(x, binary=rng.random() < 0.5)],
                                outputs=[httpclient.InferRequestedOutput(n) for n in names] or None)  # fmt: skip
        else:
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            requested = [grpcclient.InferRequestedOutput(n) for n in names] or None
            result = grpc.infer("two", [inp], outputs=requested, client_timeout=60)
        expected = {"double": x + x, "neg": -x}
        for name in names or ["double", "neg"]:
            if not np.array_equal(result.as_numpy(name), expected[name]):
                problems.append(f"client {seed} request {i}: wrong {name}")
    return problems


@pytest.mark.slow
def test_dynamic_batcher_survives_mixed_concurrent_traffic(served: dict[str, Any]) -> None:
    """16 concurrent clients, 1-3 rows, different requested outputs, HTTP and gRPC (ac0b701: the batcher
    task died on the first request it had to skip and every later request hung). Bounds prove no hang; a
    fresh server process under the same traffic then shuts down fast."""
    tmp = served["tmp"]
    server = ServeProcess(served["repo"], tmp / "batcher.log", extra=["--model", "two"])
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_mixed_client, server, seed, 12) for seed in range(16)]
            done, pending = wait(futures, timeout=90)
            assert not pending, f"{len(pending)} of 16 clients still waiting after 90 s: the batcher hangs"
        assert [p for f in done for p in f.result()] == []
        client = server.http_client()
        assert client.is_server_ready() and client.is_model_ready("two")
        assert {m["name"]: m["state"] for m in client.get_model_repository_index()}["two"] == "READY"
        metrics = httpx.get(f"http://{server.http}/metrics").text
        count = next(
            line for line in metrics.splitlines() if line.startswith('modelseal_batch_size_count{model="two"}')
        )
        assert float(count.split()[-1]) < 16 * 12, "requests should have been batched"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - started < 15
    finally:
        server.stop()


# Run in a fresh interpreter: the test process has tritonclient's generated protobuf modules loaded, and
# compiling modelseal's own model_config.proto (same package names) into that descriptor pool crashes.
BATCHER_SCENARIO = """
import asyncio, sys
import numpy as np
from modelseal.serve.batching import MAX_RESTARTS
from modelseal.serve.errors import ServeError
from modelseal.serve.server import ServeConfig, Server

async def refused(awaitable, match):
    try:
        await asyncio.wait_for(awaitable, 10)  # failed with the reason, not left hanging
    except ServeError as exc:
        assert match in str(exc), exc
    else:
        raise AssertionError("not refused")

async def scenario():
    server = Server(ServeConfig(repository=sys.argv[1], models=["two"]))
    await server.models.load("two")
    server.started = True
    batcher = server.models.get("two").batcher
    x = {"x": np.ones((1, 4), np.float32)}
    bad = {"x": np.ones((1, 4), np.float64)}  # unchecked on purpose: the runtime raises for this batch
    failed, ok = await asyncio.wait_for(
        asyncio.gather(batcher.submit(bad, ["double"]), batcher.submit(x, ["neg"]), return_exceptions=True), 10)
    assert isinstance(failed, Exception) and np.array_equal(ok["neg"], -x["x"]), (failed, ok)
    deaths = 0
    while not batcher.failure:  # kill every worker while a request waits in the queue
        assert server.ready and deaths <= MAX_RESTARTS
        waiting = asyncio.ensure_future(batcher.submit(x, ["double"]))
        await asyncio.sleep(0)
        tasks = list(batcher.tasks)
        for task in tasks:
            task.cancel()
        await refused(waiting, "dynamic batcher")
        await asyncio.sleep(0.01)
        deaths += len(tasks)
        assert batcher.failure or len(batcher.tasks) == 2  # restarted
    assert deaths in (MAX_RESTARTS + 1, MAX_RESTARTS + 2), deaths
    assert not server.ready and server.models.dead_batchers() == ["two"]
    try:
        server.models.get("two")
        raise AssertionError("a model with a dead batcher was handed out")
    except ServeError as exc:
        assert "dynamic batcher" in str(exc), exc
    row = {m["name"]: m for m in server.models.index()}["two"]
    assert row["state"] == "UNAVAILABLE" and "dynamic batcher" in row["reason"], row
    await refused(batcher.submit(x, ["double"]), "dynamic batcher")
    await server.models.load("two")  # loading it again brings it back
    assert server.ready
    await server.models.close()
    print("scenario ok")

asyncio.run(scenario())
"""


def test_batcher_failures_fail_their_requests_restart_and_show_in_readiness(served: dict[str, Any]) -> None:
    """On the real model, in a server's model manager: a batch whose run raises fails its requests with
    the error and the worker serves the next; a worker that dies has its queue failed and is restarted;
    one that keeps dying makes the model (and the server) not ready, with the reason, and new requests are
    refused at once instead of hanging."""
    result = subprocess.run([sys.executable, "-c", BATCHER_SCENARIO, str(served["repo"])],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "scenario ok" in result.stdout, result.stderr[-3000:]


def test_config_that_disagrees_with_its_model_is_unavailable_with_the_reason(served: dict[str, Any]) -> None:
    """ac0b701 loaded these as READY, published the config's metadata and answered every request with 500."""
    server = served["server"]
    index = {m["name"]: m for m in server.http_client().get_model_repository_index()}
    log = (served["tmp"] / "serve.log").read_text()
    for name, _, reason in MISMATCHED + UNUSABLE:
        assert index[name]["state"] == "UNAVAILABLE" and reason in index[name].get("reason", ""), index[name]
        assert f"model {name} cannot be loaded" in log and reason in log
        r = post(server, f"/v2/repository/models/{name}/load", b"")
        assert r.status_code == 400 and reason in r.json()["error"], (name, r.status_code, r.text)
        assert httpx.get(f"http://{server.http}/v2/models/{name}").status_code == 503  # no metadata published
    assert post(server, "/v2/repository/models/nonexistent/load", b"").status_code == 404
    assert index["two"]["state"] == "READY"
    for name, _ in COMPLETED:
        assert index[name]["state"] == "READY", index[name]
        config = httpx.get(f"http://{server.http}/v2/models/{name}/config").json()
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}], config
        assert config["max_batch_size"] == 4, config  # the config's; a model completed from nothing: the default


def _serve_on(tmp: Path, http: str, grpc: str) -> subprocess.CompletedProcess[str]:
    (tmp / "empty-repo").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "modelseal", "serve", "-r", str(tmp / "empty-repo"), "--http", http, "--grpc", grpc]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("busy", ["HTTP", "gRPC"])
def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path, busy: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        other = f"127.0.0.1:{free_port()}"
        result = _serve_on(tmp_path, *((taken, other) if busy == "HTTP" else (other, taken)))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen for {busy} on {taken}" in lines[0] and "already in use" in lines[0]


def test_a_body_that_is_not_valid_compressed_data_is_a_400(served: dict[str, Any]) -> None:
    """A ``Content-Encoding`` whose body does not decode (ac0b701: 500 and a traceback in the log) is a 400
    naming the encoding, the connection serves on, and a real gzip request from tritonclient still works."""
    server = served["server"]
    garbage = b"this is not compressed data " * 20
    for encoding in ("gzip", "deflate", "br"):
        r = post(server, "/v2/models/two/infer", garbage, {"Content-Encoding": encoding})
        assert r.status_code == 400 and f"not valid {encoding} data" in r.json()["error"], (encoding, r.text)
    x = np.ones((1, 4), np.float32)
    result = server.http_client().infer("two", [_http_input(x)], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("double"), x + x)
    time.sleep(0.2)
    assert "Traceback" not in (served["tmp"] / "serve.log").read_text()


def test_compressed_bodies_are_charged_what_they_may_decode_to(served: dict[str, Any]) -> None:
    """ac0b701 charged a gzip body its compressed size (4 KB here) and then decoded it to the 4 MiB body
    limit: eight such bodies held 2 GB against a 64 MiB budget. Now each is charged the body limit while
    it arrives, so with 8 MiB of budget two held bodies fill it and a third is refused at once (429); the
    two are answered when they complete, and a body that decodes past the limit is a 413."""
    import gzip

    server = served["server"]
    host, port = server.http.split(":")
    near_cap = gzip.compress(j(tensor_json(pad="x" * (4 * 1024 * 1024 - 200))))
    assert len(near_cap) < 16 * 1024

    def start(body: bytes, sent: int) -> socket.socket:
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v2/models/two/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])  # fmt: skip
        return s

    held = [start(near_cap, 100) for _ in range(2)]
    try:
        time.sleep(0.5)  # both reached their handlers and were charged
        third = start(near_cap, len(near_cap))
        reply = third.recv(4096).decode(errors="replace")
        third.close()
        assert reply.startswith("HTTP/1.1 429") and "server busy" in reply, reply[:300]
        for s in held:
            s.sendall(near_cap[100:])
        for s in held:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    past_cap = gzip.compress(j(tensor_json(pad="x" * (4 * 1024 * 1024 + 100))))
    r = post(server, "/v2/models/two/infer", past_cap, {"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "too large" in r.json()["error"], r.text
    x = np.ones((1, 4), np.float32)
    result = server.http_client().infer("two", [_http_input(x)], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("neg"), -x)


YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)
) + "name: [*h]\n"  # fmt: skip
HOSTILE_CONFIGS = [
    ("yaml_bomb", "config.yaml", YAML_BOMB, "YAML aliases"),
    ("many_instances", "config.pbtxt", batched("many_instances").replace("count: 2", "count: 100000"), "at most 64"),
    ("endless_delay", "config.pbtxt",
     batched("endless_delay", extra="dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }"),
     "max_queue_delay_microseconds is at most"),
    ("bad_preferred", "config.pbtxt",
     batched("bad_preferred", extra="dynamic_batching { preferred_batch_size: [ 0, 9 ] }"), "preferred_batch_size"),
    ("huge_config", "config.pbtxt", batched("huge_config") + "#" * (2 << 20), "at most 1048576"),
]  # fmt: skip


def test_hostile_configs_are_refused_at_load_with_a_short_reason(served: dict[str, Any]) -> None:
    """A 600-byte YAML alias bomb (ac0b701: a 64 MB log line and index reason), instance_group count 100000,
    a queue delay of 2**64-1 us (ac0b701: READY, and requests never answered), preferred batch sizes
    outside 1..max_batch_size, a 2 MiB config, and a FIFO named config.pbtxt (ac0b701: the event loop
    blocked forever): each load is a 400 with the reason, and the server keeps answering."""
    import os

    server, repo = served["server"], served["repo"]
    for name, filename, text, _ in HOSTILE_CONFIGS:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(two_outputs_model())
        (repo / name / filename).write_text(text)
    (repo / "fifo" / "1").mkdir(parents=True)
    os.mkfifo(repo / "fifo" / "config.pbtxt")
    for name, _, _, reason in [*HOSTILE_CONFIGS, ("fifo", "", "", "not a regular file")]:
        r = post(server, f"/v2/repository/models/{name}/load", b"")
        assert r.status_code == 400 and reason in r.json()["error"], (name, r.status_code, r.text[:300])
        assert len(r.text) < 2000, (name, len(r.text))
    index = {m["name"]: m for m in server.http_client().get_model_repository_index()}
    assert all(len(index[name]["reason"]) < 1100 for name, *_ in HOSTILE_CONFIGS), index
    assert index["two"]["state"] == "READY"
    assert max(map(len, (served["tmp"] / "serve.log").read_text().splitlines())) < 3000


def test_load_and_unload_finish_when_their_clients_give_up(served: dict[str, Any]) -> None:
    """Attack run 2 saw load/unload churn leave a dynamically batched model LOADING for good. Not reproduced
    here (this guard passes on the code before the fix too); the fix closes one way to get there: gRPC
    cancels the handler of a call whose deadline passed, and a load cancelled halfway left the state
    LOADING and its half-built instances (decrypted weights) closed by nobody."""
    import concurrent.futures

    server, repo = served["server"], served["repo"]
    add(repo, "churn", batched("churn", extra="dynamic_batching { max_queue_delay_microseconds: 1000 }"),
        two_outputs_model())  # fmt: skip

    def give_up(i: int) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc)
        call = client.load_model if i % 3 else client.unload_model
        with contextlib.suppress(Exception):  # the deadline passes before the server has finished
            call("churn", client_timeout=0.002 * (1 + i % 7))
        with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=f"http://{server.http}") as c:
            c.post(f"/v2/repository/models/churn/{'load' if i % 2 else 'unload'}", timeout=0.003 * (1 + i % 5))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(give_up, range(120)))
    x = np.ones((1, 4), np.float32)

    def serves_after_a_patient_load() -> bool:
        # abandoned requests the server received still run (to their end) and may unload it again: the
        # property is that the model is never stuck, so a patient load soon leaves it serving
        if post(server, "/v2/repository/models/churn/load", b"").status_code != 200:
            return False
        try:
            return server.http_client().infer("churn", [_http_input(x)]).as_numpy("neg") is not None
        except Exception:
            return False

    wait_for(serves_after_a_patient_load, 60, "the churned model to serve after a patient load")
