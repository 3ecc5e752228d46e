"""Tensor data types of the Open Inference Protocol, their numpy dtypes and Triton config names."""

from __future__ import annotations

import numpy as np

from modelseal.errors import UsageError

# V2 protocol name -> numpy dtype (BYTES is variable length; not served by modelseal's runtimes yet)
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
}
V2 = {dtype: name for name, dtype in NUMPY.items()}
# which InferTensorContents field carries each type in gRPC's typed (non-raw) form
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
}


def from_config(type_name: str) -> str:
    """``TYPE_FP32`` (config.pbtxt) -> ``FP32`` (protocol)."""
    name = type_name.removeprefix("TYPE_")
    if name not in NUMPY:
        raise UsageError(f"data type {type_name} is not supported (supported: {', '.join(NUMPY)})")
    return name


def numpy_dtype(v2_name: str) -> np.dtype:
    try:
        return NUMPY[v2_name]
    except KeyError:
        raise UsageError(f"data type {v2_name!r} is not supported (supported: {', '.join(NUMPY)})") from None


def v2_name(dtype: np.dtype) -> str:
    try:
        return V2[np.dtype(dtype)]
    except KeyError:
        raise UsageError(f"numpy dtype {dtype} has no Open Inference Protocol type") from None
