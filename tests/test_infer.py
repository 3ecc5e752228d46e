"""The one V2 request module without a server: REST bodies (JSON and the binary tensor extension) and gRPC
``ModelInferRequest`` messages decode to the same :class:`InferRequest`, are validated against a model's
config with the same messages, and responses encode for both transports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelseal.serve.errors import ServeError
from modelseal.serve.infer import InferRequest, decode_grpc, decode_rest, validate
from modelseal.serve.repository import ModelSpec, TensorSpec

BATCHED = ModelSpec(
    name="m", path=Path("."), platform="onnxruntime_onnx", max_batch_size=4,
    inputs=(TensorSpec("x", "FP32", (3,)), TensorSpec("n", "INT64", (-1,))),
    outputs=(TensorSpec("y", "FP32", (3,)), TensorSpec("z", "FP32", (1,))),
)  # fmt: skip
FIXED = ModelSpec(name="f", path=Path("."), platform="onnxruntime_onnx", max_batch_size=0,
                  inputs=(TensorSpec("i", "INT8", (2,)),), outputs=(TensorSpec("o", "INT8", (2,)),))  # fmt: skip


def rest(body: Any, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps(body).encode()
    return head + binary, str(len(head)) if binary else None


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(ServeError) as caught:
        call(*args)
    assert caught.value.status == 400 and caught.value.grpc_code == "INVALID_ARGUMENT"
    return str(caught.value)


@pytest.fixture(scope="module")
def pb() -> Any:
    """The V2 gRPC messages as a real client builds them (tritonclient's generated module: the same
    package, names and field numbers as the server's ``protocol/inference.proto``)."""
    return pytest.importorskip("tritonclient.grpc.service_pb2")


# --- REST -----------------------------------------------------------------------------------------


def test_rest_json_body_decodes_to_arrays_and_output_choices() -> None:
    body, header = rest({
        "id": "r1", "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [[1, 2, "NaN"]]},
                   {"name": "n", "datatype": "INT64", "shape": [1, 2], "data": [7, 8]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    })  # fmt: skip
    request = decode_rest(body, header)
    assert request.id == "r1" and request.outputs == ["y"]
    assert request.binary == {"*": True, "y": False}
    assert request.inputs["x"].dtype == np.float32 and request.inputs["x"].shape == (1, 3)
    assert np.isnan(request.inputs["x"][0, 2]) and request.inputs["n"].tolist() == [[7, 8]]
    assert validate(BATCHED, request.inputs, []) == ["y", "z"]  # no outputs named: every declared one


def test_rest_binary_extension_reads_each_input_from_its_slice_of_the_body() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = np.array([[1], [2]], dtype=np.int64)
    body, header = rest({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "n", "datatype": "INT64", "shape": [2, 1], "parameters": {"binary_data_size": n.nbytes}},
    ]}, x.tobytes() + n.tobytes())  # fmt: skip
    request = decode_rest(body, header)
    assert np.array_equal(request.inputs["x"], x) and np.array_equal(request.inputs["n"], n)
    assert request.validate(BATCHED) == ["y", "z"]


X = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}


@pytest.mark.parametrize(("body", "message"), [
    ([], "the request must be a JSON object"),
    ({"inputs": []}, "the request needs a non-empty 'inputs' list"),
    ({"inputs": [{k: v for k, v in X.items() if k != "data"}]}, "input x has neither 'data' nor binary data"),
    ({"inputs": [{**X, "shape": [2]}]}, "input x: 1 values do not fill shape [2]"),
    ({"inputs": [{**X, "datatype": "STRING"}]}, "input x: data type 'STRING' is not supported"),
    ({"inputs": [{**X, "shape": [-1]}]}, "input x: shape [-1] must hold integers"),
    ({"inputs": [X, X]}, "input x is given twice"),
    ({"inputs": [{**X, "name": ""}]}, "each input needs a non-empty 'name'"),
    ({"inputs": [{**X, "data": ["a"]}]}, "input x: the data are not FP32 values"),
    # values numpy would convert silently into something else (the review: "false" became True)
    ({"inputs": [{**X, "datatype": "BOOL", "data": ["false"]}]}, "input x: the data are not BOOL values"),
    ({"inputs": [{**X, "datatype": "BOOL", "data": [0]}]}, "input x: the data are not BOOL values"),
    ({"inputs": [{**X, "datatype": "INT64", "data": [1.7]}]}, "input x: the data are not INT64 values"),
    ({"inputs": [{**X, "datatype": "INT64", "data": "5"}]}, "input x: the data are not INT64 values"),
    ({"inputs": [{**X, "datatype": "INT8", "data": [True]}]}, "input x: the data are not INT8 values"),
    ({"inputs": [{**X, "data": [True]}]}, "input x: the data are not FP32 values"),
    ({"inputs": [{**X, "shape": [2], "data": [1, "nan"]}]}, "input x: the data are not FP32 values"),
    ({"inputs": [{**X, "datatype": "BYTES", "shape": [1 << 21], "data": []}]},
     "input x: the request's BYTES tensors would hold more than 1048576 elements in all"),
    ({"inputs": [{**X, "datatype": "BYTES", "shape": [1 << 19], "data": ["a"] * (1 << 19)},
                 {**X, "name": "y", "datatype": "BYTES", "shape": [1 << 19], "data": ["b"] * (1 << 19)},
                 {**X, "name": "z", "datatype": "BYTES", "shape": [1], "data": ["c"]}]},
     "input z: the request's BYTES tensors would hold more than 1048576 elements in all"),
    ({"inputs": [{**X, "datatype": "INT32", "shape": [2], "data": [True, 2]}]}, "true/false are not INT32 values"),
    ({"inputs": [{**X, "shape": [2], "data": [1, True]}]}, "true/false are not FP32 values"),
    ({"inputs": [{**X, "datatype": "INT16", "shape": [2, 1], "data": [[1], [True]]}]}, "true/false are not INT16"),
    ({"inputs": [X], "outputs": [{"name": "y"}, {"name": "y"}]}, "requested outputs ['y', 'y'] name an output twice"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": 0}}]},
     "output y: 'classification' must be an integer 1..65536"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": "2"}}]},
     "output y: 'classification' must be an integer 1..65536"),
    ({"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": True}}]},
     "output y: 'classification' must be an integer 1..65536"),
    ({"inputs": [X], "parameters": {"binary_data_output": 1}},
     "the request's parameter 'binary_data_output' must be true or false"),
])  # fmt: skip
def test_malformed_rest_bodies_are_refused_naming_the_problem(body: Any, message: str) -> None:
    assert message in refused(decode_rest, json.dumps(body).encode(), None)


def test_json_values_of_the_right_kind_are_taken() -> None:
    inputs = [{"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
              {"name": "i", "datatype": "INT32", "shape": [2], "data": [3, 3.0]},
              {"name": "f", "datatype": "FP32", "shape": [3], "data": [1, 2.5, "NaN"]},
              {"name": "e", "datatype": "INT64", "shape": [0], "data": []}]  # fmt: skip
    decoded = decode_rest(json.dumps({"inputs": inputs}).encode(), None).inputs
    assert decoded["b"].tolist() == [True, False] and decoded["i"].tolist() == [3, 3]
    assert decoded["f"][:2].tolist() == [1.0, 2.5] and np.isnan(decoded["f"][2]) and decoded["e"].size == 0


def test_a_bad_header_length_is_refused() -> None:
    assert refused(decode_rest, b"{}", "x9") == "Inference-Header-Content-Length must be a non-negative integer"
    assert refused(decode_rest, b"{}", "99") == "Inference-Header-Content-Length 99 is outside the body (2 bytes)"


def test_rest_binary_data_must_match_shapes_and_sizes_exactly() -> None:
    def binary(size: int, shape: list[int], extra: bytes) -> tuple[bytes, str | None]:
        item = {"name": "x", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}
        return rest({"inputs": [item]}, extra)

    assert refused(decode_rest, *binary(8, [3], bytes(8))) == "input x: 8 bytes of data do not match shape [3] of FP32"
    assert refused(decode_rest, *binary(8, [2], bytes(4))) == (
        "input x: binary_data_size 8 is not within the 4 bytes of binary data left"
    )
    assert refused(decode_rest, *binary(4, [1], bytes(8))) == "4 bytes of binary data belong to no input"


# --- gRPC -----------------------------------------------------------------------------------------


def test_grpc_raw_and_typed_contents_decode_like_rest(pb: Any) -> None:
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    raw = pb.ModelInferRequest(id="g1", raw_input_contents=[x.tobytes(), np.int64([[5]]).tobytes()])
    raw.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    raw.inputs.add(name="n", datatype="INT64", shape=[1, 1])
    raw.outputs.add(name="z")
    request = decode_grpc(raw)
    assert request.id == "g1" and request.outputs == ["z"]
    assert np.array_equal(request.inputs["x"], x) and request.inputs["n"].tolist() == [[5]]
    assert request.validate(BATCHED) == ["z"]

    typed = pb.ModelInferRequest()
    t = typed.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    t.contents.fp32_contents.extend([0, 1, 2])
    typed.inputs.add(name="n", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(5)
    again = decode_grpc(typed)
    assert np.array_equal(again.inputs["x"], x) and again.inputs["n"].tolist() == [[5]]


def test_malformed_grpc_requests_are_refused_naming_the_problem(pb: Any) -> None:
    empty = pb.ModelInferRequest()
    assert refused(decode_grpc, empty) == "the request has no inputs"

    counts = pb.ModelInferRequest(raw_input_contents=[bytes(4), bytes(4)])
    counts.inputs.add(name="x", datatype="FP32", shape=[1])
    assert refused(decode_grpc, counts) == "2 raw_input_contents for 1 inputs"

    both = pb.ModelInferRequest(raw_input_contents=[bytes(4)])
    both.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    assert refused(decode_grpc, both) == "input x: data in both raw_input_contents and contents"

    short = pb.ModelInferRequest(raw_input_contents=[bytes(4)])
    short.inputs.add(name="x", datatype="FP32", shape=[2])
    assert refused(decode_grpc, short) == "input x: 4 bytes of data do not match shape [2] of FP32"

    fp16 = pb.ModelInferRequest()
    fp16.inputs.add(name="h", datatype="FP16", shape=[1])
    assert refused(decode_grpc, fp16) == "input h: FP16 must be sent as raw_input_contents"

    unknown = pb.ModelInferRequest()
    unknown.inputs.add(name="s", datatype="FP8", shape=[1])
    assert "input s: data type 'FP8' is not supported" in refused(decode_grpc, unknown)

    twice = pb.ModelInferRequest()
    for _ in range(2):
        twice.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    assert refused(decode_grpc, twice) == "input x is given twice"


# --- against the model's config (both transports) -------------------------------------------------


@pytest.mark.parametrize(("spec", "inputs", "outputs", "message"), [
    (BATCHED, {"x": np.zeros((1, 3), np.float32)}, [],
     "model m expects inputs ['n', 'x']; missing ['n'], unknown []"),
    (FIXED, {"i": np.zeros(2, np.int8), "j": np.zeros(2, np.int8)}, [],
     "model f expects inputs ['i']; missing [], unknown ['j']"),
    (FIXED, {"i": np.zeros(2, np.int16)}, [], "input i must be INT8, got INT16"),
    (FIXED, {"i": np.zeros(3, np.int8)}, [], "input i has shape [3], the model expects [2]"),
    (BATCHED, {"x": np.zeros((5, 3), np.float32), "n": np.zeros((5, 1), np.int64)}, [],
     "input x: batch size must be 1..4, shape (5, 3)"),
    (BATCHED, {"x": np.zeros((1, 3), np.float32), "n": np.zeros((2, 1), np.int64)}, [],
     "all inputs must have the same batch size"),
    (BATCHED, {"x": np.zeros((1, 4), np.float32), "n": np.zeros((1, 1), np.int64)}, [],
     "input x has shape [1, 4], the model expects [-1, 3]"),
    (FIXED, {"i": np.zeros(2, np.int8)}, ["o", "p"], "model f has no output(s) ['p'] (outputs: ['o'])"),
])  # fmt: skip
def test_requests_that_disagree_with_the_config_are_refused(spec: ModelSpec, inputs: dict[str, np.ndarray],
                                                            outputs: list[str], message: str) -> None:  # fmt: skip
    assert refused(validate, spec, inputs, outputs) == message


def test_variable_dims_accept_any_size() -> None:
    inputs = {"x": np.zeros((2, 3), np.float32), "n": np.zeros((2, 7), np.int64)}
    assert validate(BATCHED, inputs, ["y"]) == ["y"]


# --- responses ------------------------------------------------------------------------------------


def test_responses_encode_for_rest_with_strict_json_and_binary_chunks() -> None:
    request = InferRequest({}, [], {"*": False, "z": True}, id="r9")
    y = np.array([[1.0, np.nan, np.inf]], np.float32)
    z = np.array([[2.5]], np.float32)
    head, chunks = request.respond("m", "3", {"y": y, "z": z}).rest()
    body = json.loads(head)  # strict: no bare NaN
    assert body["id"] == "r9" and body["model_name"] == "m" and body["model_version"] == "3"
    y_out, z_out = body["outputs"]
    assert y_out == {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [1.0, "NaN", "Infinity"]}
    assert z_out == {"name": "z", "datatype": "FP32", "shape": [1, 1], "parameters": {"binary_data_size": 4}}
    assert chunks == [z.tobytes()]


def test_responses_encode_for_grpc_as_raw_contents(pb: Any) -> None:
    y = np.arange(3, dtype=np.int64).reshape(1, 3)
    response = InferRequest({}, [], id="g2").respond("m", "1", {"y": y}).grpc(pb)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "g2")
    assert response.outputs[0].name == "y" and response.outputs[0].datatype == "INT64"
    assert list(response.outputs[0].shape) == [1, 3]
    assert response.raw_output_contents[0] == y.tobytes()
