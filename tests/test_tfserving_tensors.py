"""TF Serving's tensor encodings (modelseal.serve.tfserving.tensors): TensorProto and JSON round trips for
every served type, TensorFlow's fill rule, and the attacks a client can send in a TensorProto (a shape
that asks for gigabytes, values in the wrong field, out-of-range integers) or in JSON (ragged lists, bad
base64). Only ever a 400/413 ServeError, never another exception, never wrong values."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("grpc_tools")

from modelseal.serve import datatypes
from modelseal.serve.errors import ServeError
from modelseal.serve.protocol import tfserving
from modelseal.serve.tfserving.tensors import TF_DTYPES, from_json, from_proto, to_json, to_proto

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def pb() -> Any:
    return tfserving()


def names(pb: Any) -> dict[int, str]:
    return {v.number: v.name for v in pb.enums["DataType"].values}


def tensor(pb: Any, dtype: str, dims: list[int], **fields: Any) -> Any:
    message = pb.TensorProto(dtype=pb.enums["DataType"].values_by_name[dtype].number, **fields)
    for d in dims:
        message.tensor_shape.dim.add(size=d)
    return message


def decode(pb: Any, message: Any, limit: int = LIMIT) -> np.ndarray:
    return from_proto("x", pb.TensorProto.FromString(message.SerializeToString()), names(pb), limit)


NUMERIC = sorted(v for v in TF_DTYPES if v != "BYTES")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datatype=st.sampled_from(NUMERIC), shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_numeric_tensors_round_trip_bit_exactly(pb: Any, datatype: str, shape: list[int], seed: int) -> None:
    dtype = datatypes.numpy_dtype(datatype)
    raw = np.random.default_rng(seed).integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    array = raw.view(dtype).reshape(shape) if dtype != np.bool_ else (raw % 2).astype(bool).reshape(shape)
    message = pb.TensorProto()
    to_proto(array, message)
    back = decode(pb, message)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # NaN payloads included


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.binary(max_size=20), min_size=1, max_size=12))
def test_strings_round_trip_and_json_keeps_bytes(pb: Any, values: list[bytes]) -> None:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    message = pb.TensorProto()
    to_proto(array, message)
    assert decode(pb, message).tolist() == values
    for name in ("text", "text_bytes"):  # JSON: text where it is UTF-8 (not for *_bytes), else b64
        encoded = to_json(name, array)
        assert from_json(name, encoded, "BYTES", LIMIT).tolist() == values
        if name == "text_bytes":
            assert all(set(e) == {"b64"} for e in encoded)


def test_typed_values_follow_tensorflows_fill_rule(pb: Any) -> None:
    two = decode(pb, tensor(pb, "DT_FLOAT", [2, 3], float_val=[1.5, 2.5]))
    np.testing.assert_array_equal(two, np.array([[1.5, 2.5, 2.5], [2.5, 2.5, 2.5]], dtype=np.float32))
    assert not decode(pb, tensor(pb, "DT_INT64", [4])).any()  # no values: zeros
    assert decode(pb, tensor(pb, "DT_STRING", [2], string_val=[b"a"])).tolist() == [b"a", b"a"]
    half = decode(pb, tensor(pb, "DT_HALF", [2], half_val=[int(np.float16(1.5).view(np.uint16)), 0x3C00]))
    np.testing.assert_array_equal(half, np.array([1.5, 1.0], dtype=np.float16))
    small = decode(pb, tensor(pb, "DT_INT8", [3], int_val=[-128, 0, 127]))
    assert small.dtype == np.int8 and small.tolist() == [-128, 0, 127]
    assert decode(pb, tensor(pb, "DT_BOOL", [2], bool_val=[True, False])).tolist() == [True, False]


@pytest.mark.parametrize(
    ("dtype", "dims", "fields", "words"),
    [
        ("DT_FLOAT", [2**30, 2], {"float_val": [1.0]}, "over the request limit"),  # 8 bytes asking for 8 GiB
        ("DT_STRING", [2**21], {"string_val": [b"a"]}, "more than"),
        # a 64 KiB string repeated 2**21 times: few elements, 128 GiB once TensorFlow copies each one
        ("DT_STRING", [2, 2**20], {"string_val": [b"A" * 65536]}, "over the request limit"),
        ("DT_FLOAT", [2], {"int_val": [1, 2]}, "not int_val"),
        ("DT_FLOAT", [2], {"float_val": [1.0], "tensor_content": b"\0" * 8}, "both"),
        ("DT_FLOAT", [3], {"tensor_content": b"\0" * 8}, "do not match"),
        ("DT_FLOAT", [1], {"float_val": [1.0, 2.0]}, "more than"),
        ("DT_INT8", [1], {"int_val": [300]}, "outside INT8"),
        ("DT_HALF", [1], {"half_val": [70000]}, "not 16 bits"),
        ("DT_STRING", [1], {"tensor_content": b"abc"}, "string_val"),
        ("DT_COMPLEX64", [1], {}, "not served"),
        ("DT_RESOURCE", [1], {}, "not served"),
        ("DT_FLOAT", [-1], {}, "shape"),
    ],
)
def test_hostile_tensor_protos_are_refused(pb: Any, dtype: str, dims: list[int], fields: dict[str, Any],
                                           words: str) -> None:  # fmt: skip
    with pytest.raises(ServeError) as info:
        decode(pb, tensor(pb, dtype, dims, **fields), limit=1 << 30)
    assert words in str(info.value) and info.value.status in (400, 413)


def test_unknown_rank_and_unknown_enum_values_are_refused(pb: Any) -> None:
    unknown = tensor(pb, "DT_FLOAT", [1])
    unknown.tensor_shape.unknown_rank = True
    with pytest.raises(ServeError, match="unknown rank"):
        decode(pb, unknown)
    data = tensor(pb, "DT_FLOAT", [1]).SerializeToString().replace(b"\x08\x01", b"\x08\x63", 1)  # dtype 99
    with pytest.raises(ServeError, match="not served"):
        from_proto("x", pb.TensorProto.FromString(data), names(pb), LIMIT)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.integers(0, 25), dims=st.lists(st.integers(-2, 2**40), max_size=6), unknown=st.booleans(),
    content=st.binary(max_size=64), floats=st.lists(st.floats(width=32), max_size=8),
    ints=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8), strings=st.lists(st.binary(max_size=8), max_size=4),
)  # fmt: skip
def test_any_tensor_proto_is_a_bounded_array_or_a_refusal(pb: Any, dtype: int, dims: list[int], unknown: bool,
                                                          content: bytes, floats: list[float], ints: list[int],
                                                          strings: list[bytes]) -> None:  # fmt: skip
    message = pb.TensorProto(dtype=dtype, tensor_content=content, float_val=floats, int_val=ints, string_val=strings)
    message.tensor_shape.unknown_rank = unknown
    for d in dims:
        message.tensor_shape.dim.add(size=d)
    try:
        array = from_proto("x", message, names(pb), 4096)
    except ServeError as exc:
        assert exc.status in (400, 413)
        return
    assert list(array.shape) == dims
    assert array.nbytes <= 4096 or array.dtype == object


def test_json_tensors_take_their_shape_from_rectangular_nesting() -> None:
    np.testing.assert_array_equal(from_json("x", [[1, 2], [3, 4]], "FP32", LIMIT), np.array([[1, 2], [3, 4]], "f4"))
    assert from_json("x", 7, "INT64", LIMIT).shape == ()
    b64 = {"b64": base64.b64encode(b"\xff\x00").decode()}
    assert from_json("x", [b64, "t"], "BYTES", LIMIT).tolist() == [b"\xff\x00", b"t"]
    for ragged in ([[1, 2], [3]], [[1, 2], 3], [[[1], [2]], [[3], [4, 5]]], [1, [2]]):
        with pytest.raises(ServeError, match="ragged"):
            from_json("x", ragged, "FP32", LIMIT)
    # as many leaves as the first path's shape implies, but ragged: refused, not reshaped
    with pytest.raises(ServeError, match="ragged"):
        from_json("x", [["a", "b"], ["c"], ["d", "e", "f"]], "BYTES", LIMIT)
    for bad, words in (({"b64": "!!"}, "base64"), ({"b64": 3}, "string"), (5, "strings"), ({"b64": "AA=="}, "")):
        if words:
            with pytest.raises(ServeError, match=words):
                from_json("x", [bad], "BYTES", LIMIT)
    with pytest.raises(ServeError, match="b64 values are for DT_STRING"):
        from_json("x", [{"b64": "AA=="}], "FP32", LIMIT)
    with pytest.raises(ServeError):
        from_json("x", [True, 2], "INT32", LIMIT)  # JSON types are checked, as on the V2 routes
    with pytest.raises(ServeError, match="over the request limit"):
        from_json("x", [[0.0] * 100] * 100, "FP64", 1000)


def test_json_outputs_write_non_finite_floats_and_bfloat16_as_numbers() -> None:
    assert to_json("y", np.array([np.nan, np.inf], np.float32))[1] == float("inf")
    bf16 = datatypes.numpy_dtype("BF16")
    assert to_json("y", np.array([1.5, -2.0], dtype=bf16)) == [1.5, -2.0]


def test_decoded_size_counts_what_the_fill_rule_makes(pb: Any) -> None:
    from modelseal.serve.tfserving.tensors import decoded_size

    assert decoded_size("x", tensor(pb, "DT_FLOAT", [1000, 4], float_val=[1.0]), names(pb)) == 16000
    strings = tensor(pb, "DT_STRING", [4], string_val=[b"ab", b"cdef"])
    assert decoded_size("x", strings, names(pb)) == 2 + 4 + 2 * 4  # the last one repeats


def test_null_bf16_overflow_and_bool_bytes_are_refused() -> None:
    """JSON null became NaN in float inputs (V2 too); a float32 past BF16's range became infinity; BOOL
    raw bytes other than 0/1 went through as numpy bools holding 2 or 255 (V2's binary path too)."""
    from modelseal.serve import infer

    for datatype in ("FP32", "FP16", "BF16", "BOOL"):
        with pytest.raises(ServeError, match="null"):
            from_json("x", [None, 1], datatype, LIMIT)
    with pytest.raises(ServeError, match="null"):
        infer.tensor("x", "FP64", [2], values=[None, 1.0])
    with pytest.raises(ServeError, match="range of BF16"):
        from_json("x", [3.4e38], "BF16", LIMIT)
    with pytest.raises(ServeError, match="other than 0 and 1"):
        infer.tensor("x", "BOOL", [2], raw=b"\x02\x00")
    assert infer.tensor("x", "BOOL", [2], raw=b"\x01\x00").tolist() == [True, False]
