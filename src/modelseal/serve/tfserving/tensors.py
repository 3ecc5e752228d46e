"""Tensors in TF Serving's two encodings: ``TensorProto`` (gRPC) and JSON (REST), to and from numpy.

Everything a client sends is bounded before it is allocated. A ``TensorProto`` may give fewer typed values
than its shape holds (TensorFlow repeats the last one, and fills an empty list with zeros), so a 30-byte
message can name a tensor of 2**31 floats: the size its shape implies is checked against the server's
request-size limit first. Values sent in a field that is not their type's (``int_val`` for ``DT_FLOAT``)
are refused rather than ignored, as TensorFlow would, which would run the model on zeros.

JSON follows TF Serving's REST API: nested lists whose nesting gives the shape (checked to be
rectangular), binary strings as ``{"b64": ...}``, and string outputs whose name ends in ``_bytes`` (or that
are not UTF-8) sent back base64-encoded; non-finite floats are answered as bare ``NaN``/``Infinity``, as
TF Serving does. Requests are strict JSON (modelseal's one bounded reader), so non-finite inputs are the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, and ``null`` is no number.

Sizes are what a tensor *will take once decoded*, which for a ``TensorProto`` filled by repetition is not
its size on the wire: :func:`decoded_size` gives it without allocating anything, strings counted by their
bytes (a 64 KiB string repeated 16,384 times is a gigabyte once TensorFlow copies each element), and the
gRPC transport checks it against the request limit and charges it to the in-flight budget before decoding.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from modelseal.serve import datatypes
from modelseal.serve import infer as v2
from modelseal.serve.errors import ServeError, bad_request

# V2 datatype <-> TensorFlow DataType (tensorflow/core/framework/types.proto)
TF_DTYPES = {
    "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE", "INT32": "DT_INT32", "UINT8": "DT_UINT8", "INT16": "DT_INT16",
    "INT8": "DT_INT8", "BYTES": "DT_STRING", "INT64": "DT_INT64", "BOOL": "DT_BOOL", "BF16": "DT_BFLOAT16",
    "UINT16": "DT_UINT16", "FP16": "DT_HALF", "UINT32": "DT_UINT32", "UINT64": "DT_UINT64",
}  # fmt: skip
V2_DTYPES = {tf: v2_name for v2_name, tf in TF_DTYPES.items()}
# the TensorProto field holding each type's values when they are not in tensor_content
VALUE_FIELD = {
    "DT_FLOAT": "float_val", "DT_DOUBLE": "double_val", "DT_INT32": "int_val", "DT_UINT8": "int_val",
    "DT_INT16": "int_val", "DT_INT8": "int_val", "DT_UINT16": "int_val", "DT_STRING": "string_val",
    "DT_INT64": "int64_val", "DT_BOOL": "bool_val", "DT_HALF": "half_val", "DT_BFLOAT16": "half_val",
    "DT_UINT32": "uint32_val", "DT_UINT64": "uint64_val",
}  # fmt: skip
TYPED_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                "bool_val", "dcomplex_val", "uint32_val", "uint64_val")  # fmt: skip


def tf_dtype(v2_name: str) -> str:
    """The TensorFlow DataType name of a V2 datatype (``FP32`` -> ``DT_FLOAT``)."""
    return TF_DTYPES[v2_name]


def _within(name: str, dims: list[int], size: int, count: int, strings: bool, max_bytes: int) -> None:
    """Refuse (413 / RESOURCE_EXHAUSTED) a tensor of ``size`` decoded bytes past ``max_bytes``, or of more
    strings than a request may hold."""
    if size > max_bytes:
        raise ServeError(413, f"input {name}: shape {dims} would take {size} bytes, over the request limit "
                              f"of {max_bytes} bytes")  # fmt: skip
    if strings and count > v2.MAX_BYTES_ELEMENTS:
        raise ServeError(413, f"input {name}: {count} strings are more than {v2.MAX_BYTES_ELEMENTS} in one tensor")


def _header(name: str, tensor: Any, dtype_names: Any) -> tuple[str, str, list[int]]:
    """(DataType name, V2 datatype, dims) of a ``TensorProto``, each checked."""
    dtype_name = dtype_names.get(tensor.dtype, str(tensor.dtype))
    datatype = V2_DTYPES.get(dtype_name)
    if datatype is None:
        raise bad_request(f"input {name}: data type {dtype_name} is not served (served: {', '.join(VALUE_FIELD)})")
    if tensor.tensor_shape.unknown_rank:
        raise bad_request(f"input {name}: the tensor's shape has an unknown rank")
    return dtype_name, datatype, v2.check_shape(name, [d.size for d in tensor.tensor_shape.dim])


def decoded_size(name: str, tensor: Any, dtype_names: Any) -> int:
    """The bytes ``tensor`` takes once decoded (strings: their bytes, the repeated last one included),
    computed without decoding it."""
    dtype_name, datatype, dims = _header(name, tensor, dtype_names)
    count = math.prod(dims)
    if dtype_name != "DT_STRING":
        return count * datatypes.numpy_dtype(datatype).itemsize
    values = tensor.string_val
    given = min(len(values), count)
    return sum(len(v) for v in values) + (count - given) * (len(values[-1]) if values else 0)


def from_proto(name: str, tensor: Any, dtype_names: Any, max_bytes: int) -> np.ndarray:
    """A ``TensorProto`` as a numpy array (strings: an object array of bytes). ``dtype_names`` maps the
    DataType enum's numbers to names; ``max_bytes`` bounds the tensor's decoded size."""
    dtype_name, datatype, dims = _header(name, tensor, dtype_names)
    dtype = datatypes.numpy_dtype(datatype)
    count = math.prod(dims)
    _within(name, dims, decoded_size(name, tensor, dtype_names), count, dtype_name == "DT_STRING", max_bytes)
    field = VALUE_FIELD[dtype_name]
    stray = [f for f in TYPED_FIELDS if f != field and len(getattr(tensor, f))]
    if stray:
        raise bad_request(f"input {name}: {dtype_name} values belong in {field} or tensor_content, not {stray[0]}")
    if tensor.tensor_content:
        if dtype_name == "DT_STRING":
            raise bad_request(f"input {name}: DT_STRING values belong in string_val, not tensor_content")
        if len(getattr(tensor, field)):
            raise bad_request(f"input {name}: values in both tensor_content and {field}")
        return v2.tensor(name, datatype, dims, raw=tensor.tensor_content)
    values = getattr(tensor, field)
    given = len(values)
    if given > count:
        raise bad_request(f"input {name}: {given} values are more than shape {dims} holds ({count})")
    if dtype_name == "DT_STRING":
        array = np.empty(given, dtype=object)
        array[:] = list(values)
    elif field == "half_val":  # the 16 bits of each half or bfloat16, in an int32
        array = np.asarray(values, dtype=np.int64)
        if given and (array.min() < 0 or array.max() > 0xFFFF):
            raise bad_request(f"input {name}: half_val holds a value that is not 16 bits")
        array = array.astype(np.uint16).view(dtype)
    else:
        array = np.asarray(values, dtype=np.int64 if field == "int_val" else None)
        if field == "int_val" and given:
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise bad_request(f"input {name}: int_val holds a value outside {datatype}")
        array = array.astype(dtype)
    if given < count:  # TensorFlow's rule: the last value repeats; none given is zeros (empty strings)
        fill = array[-1] if given else (b"" if dtype_name == "DT_STRING" else dtype.type(0))
        whole = np.empty(count, dtype=dtype) if dtype_name == "DT_STRING" else np.full(count, fill, dtype=dtype)
        if dtype_name == "DT_STRING":
            whole[:] = fill
        whole[:given] = array
        array = whole
    return array.reshape(dims)


def to_proto(array: np.ndarray, tensor: Any) -> None:
    """Fill ``tensor`` (a ``TensorProto``) with ``array``: numbers as ``tensor_content`` (little-endian),
    strings as ``string_val``."""
    datatype = datatypes.v2_name(array.dtype)
    tensor.dtype = tf_dtype(datatype)
    for d in array.shape:
        tensor.tensor_shape.dim.add(size=d)
    if datatype == "BYTES":
        tensor.string_val.extend(v2.as_bytes(v) for v in array.ravel())
    else:
        tensor.tensor_content = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


# --- JSON ------------------------------------------------------------------------------------------


def is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _nested_shape(name: str, value: Any) -> tuple[list[int], list[Any]]:
    """The shape of a nested list (every list at one depth as long as the others, leaves all at one
    depth) and its leaves in row-major order; a ragged list is a 400."""
    dims: list[int] = []
    level = [value]
    while level and isinstance(level[0], list):
        if not all(isinstance(v, list) for v in level):
            raise bad_request(f"input {name}: the nested lists are ragged (lists and values at one depth)")
        length = len(level[0])
        if any(len(v) != length for v in level):
            raise bad_request(f"input {name}: the nested lists are ragged (lists of different lengths at one depth)")
        dims.append(length)
        level = [item for v in level for item in v]
        if len(dims) > v2.MAX_RANK:
            raise bad_request(f"input {name}: more than {v2.MAX_RANK} dimensions")
    if any(isinstance(v, list) for v in level):
        raise bad_request(f"input {name}: the nested lists are ragged (lists and values at one depth)")
    return dims, level


def _string(name: str, value: Any) -> bytes:
    if is_b64(value):
        if not isinstance(value["b64"], str):
            raise bad_request(f"input {name}: a b64 value must be a string")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"input {name}: a b64 value is not valid base64") from None
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"input {name}: a string that is not valid Unicode") from None
    raise bad_request(f"input {name}: DT_STRING values must be strings or {{\"b64\": ...}}, not {type(value).__name__}")


def from_json(name: str, value: Any, datatype: str, max_bytes: int) -> np.ndarray:
    """A JSON value (a number, string, ``{"b64"}`` or nested list of them) as a tensor of the model's
    ``datatype`` for input ``name``."""
    dims, leaves = _nested_shape(name, value)
    dtype = datatypes.numpy_dtype(datatype)
    _within(name, dims, len(leaves) * dtype.itemsize, len(leaves), datatype == "BYTES", max_bytes)
    if datatype == "BYTES":
        array = np.empty(len(leaves), dtype=object)
        array[:] = [_string(name, v) for v in leaves]
        return array.reshape(dims)
    if any(is_b64(v) for v in leaves):
        raise bad_request(f"input {name}: b64 values are for DT_STRING inputs, not {tf_dtype(datatype)}")
    if datatype == "BF16":  # no JSON number is a bfloat16: read as float32, then rounded (not past its range)
        wide = v2.tensor(name, "FP32", dims, values=leaves)
        narrow = wide.astype(dtype)
        if np.any(np.isinf(narrow.astype(np.float32)) & np.isfinite(wide)):
            raise bad_request(f"input {name}: a value is outside the range of BF16")
        return narrow
    return v2.tensor(name, datatype, dims, values=leaves)


def to_json(name: str, array: np.ndarray) -> Any:
    """A tensor as JSON (nested lists; a scalar as a value). Strings are text, or ``{"b64"}`` when the
    output's name ends in ``_bytes`` or the bytes are not UTF-8; NaN and infinities stay floats (the
    encoder writes them bare, as TF Serving does)."""
    if array.dtype.kind in "OSU":
        encoded = np.empty(array.shape, dtype=object)
        flat = encoded.reshape(-1)
        for i, v in enumerate(array.ravel()):
            data = v2.as_bytes(v)
            text = None
            if not name.endswith("_bytes"):
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            flat[i] = text if text is not None else {"b64": base64.b64encode(data).decode("ascii")}
        return encoded.tolist()
    if datatypes.v2_name(array.dtype) == "BF16":
        array = array.astype(np.float32)
    return array.tolist()
