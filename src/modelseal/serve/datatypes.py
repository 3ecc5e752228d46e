"""Tensor data types of the Open Inference Protocol, their numpy dtypes and Triton config names.

Canonical in-server forms: fixed-size types as their numpy dtype; ``BF16`` as ``ml_dtypes.bfloat16``
(numpy has none; the ``serve`` extra installs ml-dtypes, as tritonclient does); ``BYTES`` (Triton's
``TYPE_STRING``) as a numpy object array whose elements are ``bytes``."""

from __future__ import annotations

import numpy as np

from modelseal.errors import UsageError

try:
    from ml_dtypes import bfloat16 as _bfloat16
except ImportError:  # pragma: no cover - the serve extra installs it
    _bfloat16 = None

BYTES = np.dtype(object)
BF16: np.dtype | None = np.dtype(_bfloat16) if _bfloat16 is not None else None

# V2 protocol name -> numpy dtype
NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": BYTES,
}
if BF16 is not None:
    NUMPY["BF16"] = BF16
V2 = {dtype: name for name, dtype in NUMPY.items()}
# which InferTensorContents field carries each type in gRPC's typed (non-raw) form; FP16 and BF16 have
# none (raw_input_contents only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Triton config names that differ from the protocol's
_CONFIG_ALIASES = {"STRING": "BYTES"}


def from_config(type_name: str) -> str:
    """``TYPE_FP32`` (config.pbtxt) -> ``FP32`` (protocol); ``TYPE_STRING`` -> ``BYTES``."""
    name = type_name.removeprefix("TYPE_")
    name = _CONFIG_ALIASES.get(name, name)
    if name == "BF16" and BF16 is None:
        raise UsageError("data type TYPE_BF16 needs ml-dtypes: pip install 'modelseal[serve]'")
    if name not in NUMPY:
        raise UsageError(f"data type {type_name} is not supported (supported: {', '.join(NUMPY)})")
    return name


def numpy_dtype(v2_name: str) -> np.dtype:
    try:
        return NUMPY[v2_name]
    except KeyError:
        raise UsageError(f"data type {v2_name!r} is not supported (supported: {', '.join(NUMPY)})") from None


def v2_name(dtype: np.dtype | type) -> str:
    """The V2 name of a numpy dtype; object, str and bytes arrays are all ``BYTES``."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return V2[dtype]
    except KeyError:
        raise UsageError(f"numpy dtype {dtype} has no Open Inference Protocol type") from None
