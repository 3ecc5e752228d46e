"""Data types of the V2 protocol without a server: BYTES (Triton's length-prefixed binary form, JSON strings,
gRPC ``bytes_contents``), BF16 (binary only, ``ml_dtypes.bfloat16``), FP16 in JSON, and scalar and
zero-size tensors of every type, decoded by ``serve/infer.py`` and read back by tritonclient's own
decoders."""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal.errors import UsageError
from modelseal.serve import datatypes
from modelseal.serve.errors import ServeError
from modelseal.serve.infer import InferRequest, decode_bytes, decode_grpc, decode_rest, encode_bytes

BF16 = np.dtype(ml_dtypes.bfloat16)
ELEMENTS = st.lists(st.binary(max_size=40), max_size=20)


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(ServeError) as caught:
        call(*args)
    assert caught.value.status == 400 and caught.value.grpc_code == "INVALID_ARGUMENT"
    return str(caught.value)


def byte_array(values: list[bytes], shape: Any = None) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape if shape is not None else [len(values)])


def rest(body: Any, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps(body).encode()
    return head + binary, str(len(head)) if binary else None


@pytest.fixture(scope="module")
def pb() -> Any:
    return pytest.importorskip("tritonclient.grpc.service_pb2")


# --- the BYTES length-prefixed codec --------------------------------------------------------------


@given(ELEMENTS)
def test_bytes_round_trip_and_match_tritonclient(values: list[bytes]) -> None:
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    array = byte_array(values)
    encoded = encode_bytes(array)
    assert encoded == (serialize_byte_tensor(array).item() if values else b"")
    decoded = decode_bytes(encoded, len(values))
    assert decoded.dtype == object and decoded.tolist() == values
    assert deserialize_bytes_tensor(encoded).tolist() == values


@settings(max_examples=50)
@given(ELEMENTS.filter(bool), st.data())
def test_truncated_bytes_data_are_refused(values: list[bytes], data: st.DataObject) -> None:
    encoded = encode_bytes(byte_array(values))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert "BYTES" in refused(decode_bytes, encoded[:cut], len(values))


@settings(max_examples=50)
@given(ELEMENTS.filter(bool), st.data())
def test_a_length_prefix_past_the_data_is_refused(values: list[bytes], data: st.DataObject) -> None:
    encoded = bytearray(encode_bytes(byte_array(values)))
    i = data.draw(st.integers(0, len(values) - 1))
    at = sum(4 + len(v) for v in values[:i])
    left = len(encoded) - at - 4  # bytes after this prefix
    grown = data.draw(st.integers(left + 1, 2**32 - 1))
    struct.pack_into("<I", encoded, at, grown)
    message = refused(decode_bytes, bytes(encoded), len(values))
    assert f"BYTES element {i} has length {grown}, past the end of the data" in message


@given(ELEMENTS, st.binary(min_size=1, max_size=8))
def test_bytes_after_the_last_element_are_refused(values: list[bytes], extra: bytes) -> None:
    encoded = encode_bytes(byte_array(values)) + extra
    assert "follow the last of its" in refused(decode_bytes, encoded, len(values))


def test_a_huge_bytes_shape_with_little_data_is_refused_before_any_work() -> None:
    message = refused(decode_bytes, b"\x00" * 12, 2**31 - 1, "s", [2**31 - 1])
    assert message == ("input s: 12 bytes of data cannot hold the 2147483647 BYTES elements of shape "
                       "[2147483647] (each takes at least 4)")  # fmt: skip


# --- BYTES through both transports ----------------------------------------------------------------


def test_bytes_inputs_from_json_binary_and_grpc(pb: Any) -> None:
    strings = [["héllo", ""], ["a", "z"]]
    body, header = rest({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2, 2], "data": strings}]})
    array = decode_rest(body, header).inputs["s"]
    assert array.dtype == object and array.shape == (2, 2) and array[0, 0] == "héllo".encode()

    raw = encode_bytes(byte_array([b"\xff\x00", b"x"]))
    body, header = rest({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(raw)}}]}, raw)  # fmt: skip
    assert decode_rest(body, header).inputs["s"].tolist() == [b"\xff\x00", b"x"]

    typed = pb.ModelInferRequest()
    typed.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"\xff", b"q"])
    assert decode_grpc(typed).inputs["s"].tolist() == [b"\xff", b"q"]
    raw_request = pb.ModelInferRequest(raw_input_contents=[raw])
    raw_request.inputs.add(name="s", datatype="BYTES", shape=[1, 2])
    assert decode_grpc(raw_request).inputs["s"].tolist() == [[b"\xff\x00", b"x"]]


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "input s: BYTES data must be strings, not int"),
    ([None, "a"], "input s: BYTES data must be strings, not NoneType"),
    (["\udc80", "a"], "the request holds a string with a lone UTF-16 surrogate (not Unicode text)"),
    (["a"], "input s: 1 values do not fill shape [2]"),
])  # fmt: skip
def test_bad_json_bytes_are_refused(data: Any, message: str) -> None:
    body = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": data}]}).encode()
    assert refused(decode_rest, body, None) == message


def test_bytes_outputs_encode_as_json_strings_binary_and_grpc_raw(pb: Any) -> None:
    from tritonclient.utils import deserialize_bytes_tensor

    out = byte_array([b"caf\xc3\xa9", b"", b"x", b"yz"], [2, 2])
    head, chunks = InferRequest({}, []).respond("m", "1", {"s": out}).rest()
    assert json.loads(head)["outputs"][0] == {"name": "s", "datatype": "BYTES", "shape": [2, 2],
                                              "data": ["café", "", "x", "yz"]}  # fmt: skip
    head, chunks = InferRequest({}, [], {"*": True}).respond("m", "1", {"s": out}).rest()
    assert deserialize_bytes_tensor(chunks[0]).tolist() == out.ravel().tolist()
    response = InferRequest({}, []).respond("m", "1", {"s": out}).grpc(pb)
    assert response.outputs[0].datatype == "BYTES" and response.raw_output_contents[0] == chunks[0]
    text = np.array([["a", "é"]], dtype=object)  # what ONNX Runtime returns: str objects
    assert json.loads(InferRequest({}, []).respond("m", "1", {"s": text}).rest()[0])["outputs"][0]["data"] == ["a", "é"]


def test_bytes_that_are_not_utf8_are_refused_as_json_but_not_as_binary() -> None:
    out = byte_array([b"\xff"])
    message = refused(InferRequest({}, []).respond("m", "1", {"s": out}).rest)
    assert message == ("output s: BYTES data that are not UTF-8 cannot be sent as JSON; request it as binary data "
                       "(output parameter binary_data: true)")  # fmt: skip
    _, chunks = InferRequest({}, [], {"s": True}).respond("m", "1", {"s": out}).rest()
    assert chunks == [b"\x01\x00\x00\x00\xff"]


# --- BF16 and FP16 --------------------------------------------------------------------------------


def test_bf16_travels_as_binary_data_only(pb: Any) -> None:
    x = np.array([[1.5, -2.0, 3.25]], dtype=BF16)
    body, header = rest({"inputs": [{"name": "b", "datatype": "BF16", "shape": [1, 3],
                                     "parameters": {"binary_data_size": 6}}]}, x.tobytes())  # fmt: skip
    got = decode_rest(body, header).inputs["b"]
    assert got.dtype == BF16 and np.array_equal(got, x)
    raw = pb.ModelInferRequest(raw_input_contents=[x.tobytes()])
    raw.inputs.add(name="b", datatype="BF16", shape=[1, 3])
    assert np.array_equal(decode_grpc(raw).inputs["b"], x)

    json_body = json.dumps({"inputs": [{"name": "b", "datatype": "BF16", "shape": [1], "data": [1.5]}]}).encode()
    assert refused(decode_rest, json_body, None) == (
        "input b: BF16 data cannot be sent as JSON; send it as binary data (the binary tensor data extension; "
        "tritonclient: binary_data=True)"
    )
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="b", datatype="BF16", shape=[1]).contents.fp32_contents.append(1.5)
    assert refused(decode_grpc, typed) == "input b: BF16 must be sent as raw_input_contents"

    as_json = InferRequest({}, []).respond("m", "1", {"b": x})
    assert "output b: BF16 data cannot be sent as JSON" in refused(as_json.rest)
    head, chunks = InferRequest({}, [], {"b": True}).respond("m", "1", {"b": x}).rest()
    assert json.loads(head)["outputs"][0]["datatype"] == "BF16" and chunks == [x.tobytes()]


def test_fp16_in_json_both_ways() -> None:
    body = json.dumps({"inputs": [{"name": "h", "datatype": "FP16", "shape": [3], "data": [0.1, "NaN", -65504]}]})
    h = decode_rest(body.encode(), None).inputs["h"]
    assert h.dtype == np.float16 and h[0] == np.float16(0.1) and np.isnan(h[1]) and h[2] == -65504
    head, _ = InferRequest({}, []).respond("m", "1", {"h": h}).rest()
    data = json.loads(head)["outputs"][0]["data"]
    back = np.array(data, dtype=np.float16)  # what tritonclient's as_numpy does
    assert back[0] == h[0] and np.isnan(back[1]) and back[2] == h[2]
    over = json.dumps({"inputs": [{"name": "h", "datatype": "FP16", "shape": [1], "data": [70000]}]}).encode()
    assert "input h: the data are not FP16 values" in refused(decode_rest, over, None)


# --- scalars and zero-size tensors of every type, every path ----------------------------------------

JSON_TYPES = [n for n in datatypes.NUMPY if n != "BF16"]


def sample(name: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    if name == "BYTES":
        return byte_array([f"v{i}é".encode() for i in range(count)], shape)
    values = np.arange(1, count + 1) % 2 if name == "BOOL" else np.arange(1, count + 1)
    return values.astype(datatypes.numpy_dtype(name)).reshape(shape)


SHAPES = [(), (0,), (2, 0), (1,), (2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(datatypes.NUMPY))
def test_every_type_and_shape_round_trips_through_every_path(pb: Any, name: str, shape: tuple[int, ...]) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    array = sample(name, shape)

    def same(got: np.ndarray) -> None:
        assert datatypes.v2_name(got.dtype) == name and got.shape == shape
        if name == "BYTES":  # tritonclient reads JSON strings back as str
            got = byte_array([v.encode() if isinstance(v, str) else v for v in got.ravel().tolist()], shape)
        assert got.tolist() == array.tolist()

    # requests, as tritonclient builds them
    modes = [True, False] if name in JSON_TYPES else [True]
    for binary in modes:
        inp = httpclient.InferInput("t", list(shape), name)
        inp.set_data_from_numpy(array, binary_data=binary)
        raw = inp._get_binary_data() or b""
        body, header = rest({"inputs": [inp._get_tensor()]}, raw)
        if binary and not raw:  # an empty binary tensor: tritonclient sends the header length anyway
            header = str(len(body))
        same(decode_rest(body, header).inputs["t"])
    g = grpcclient.InferInput("t", list(shape), name)
    g.set_data_from_numpy(array)
    request = pb.ModelInferRequest(raw_input_contents=[g._get_content() or b""])
    request.inputs.append(g._get_tensor())
    same(decode_grpc(request).inputs["t"])

    # responses, as tritonclient reads them
    for binary in modes:
        head, chunks = InferRequest({}, [], {"*": binary}).respond("m", "1", {"t": array}).rest()
        result = httpclient.InferResult.from_response_body(head + b"".join(chunks), header_length=len(head))
        same(result.as_numpy("t"))
    response = InferRequest({}, []).respond("m", "1", {"t": array}).grpc(pb)
    same(grpcclient.InferResult(response).as_numpy("t"))


def test_config_names_map_to_protocol_names() -> None:
    assert datatypes.from_config("TYPE_STRING") == "BYTES"
    assert datatypes.from_config("TYPE_BF16") == "BF16"
    assert datatypes.from_config("TYPE_FP16") == "FP16"
    with pytest.raises(UsageError, match="TYPE_FP8 is not supported"):
        datatypes.from_config("TYPE_FP8")
    assert datatypes.numpy_dtype("BF16") == BF16 and datatypes.v2_name(BF16) == "BF16"
    for dtype in (np.dtype(object), np.dtype("U3"), np.dtype("S3")):
        assert datatypes.v2_name(dtype) == "BYTES"
