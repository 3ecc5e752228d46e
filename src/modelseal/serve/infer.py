"""Open Inference Protocol (KServe V2) inference requests and responses, for both transports: one
decoder per transport into :class:`InferRequest`, one validation against the model's config
(:func:`validate`), and one :class:`InferResponse` encoded for REST or gRPC. The transports (``rest``,
``grpc_api``) only move bytes and call these.

Every field a client sends is checked for its type and range here, once, so that REST and gRPC refuse
the same malformed request with the same 400 / ``INVALID_ARGUMENT`` message and nothing malformed reaches
numpy or a runtime (where it used to end as a bare 500 / ``UNKNOWN``). :func:`validate` then checks it
against the *model* (input names, dtypes, dims, batch size, output names).

Non-finite values in JSON: JSON has no NaN or infinity, and strict parsers (the KServe SDK's orjson, Go,
JavaScript) reject Python's bare ``NaN``/``Infinity``. Responses send them as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, which ``numpy.array(data, dtype)`` (what tritonclient and the KServe
SDK call) turns back into the float values. Requests are read as strict JSON too (the shared bounded
reader: no bare constants, no duplicate keys) and accept the same strings in ``data``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelseal.errors import UsageError
from modelseal.jsonlimits import JSONLimitError, loads_bounded
from modelseal.serve import datatypes
from modelseal.serve.errors import ServeError, bad_request
from modelseal.serve.repository import ModelSpec
from modelseal.version import __version__

Tensors = dict[str, np.ndarray]
EXTENSIONS = ["binary_tensor_data", "model_repository", "metrics"]
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_DEPTH = 40  # a request is ~4 levels plus one per tensor dimension when data is sent nested
MAX_RANK = 32
MAX_DIM = 2**31 - 1


def server_metadata() -> dict[str, Any]:
    """The server metadata both transports answer: name, version, extensions."""
    return {"name": "modelseal", "version": __version__, "extensions": EXTENSIONS}


@dataclass
class InferRequest:
    """A decoded request: well-formed tensors, not yet checked against a model (:meth:`validate`)."""

    inputs: Tensors
    outputs: list[str]  # empty: every output of the model
    binary: dict[str, bool] = field(default_factory=dict)  # REST: output name ("*": default) -> binary data
    id: str = ""

    def validate(self, spec: ModelSpec) -> list[str]:
        """Check the request against ``spec``'s config; the outputs to compute."""
        return validate(spec, self.inputs, self.outputs)

    def respond(self, model: str, version: str, results: Tensors) -> InferResponse:
        """The response to this request: its id, and REST's binary choices for each output."""
        return InferResponse(model, version, results, self.id, self.binary)


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: Tensors
    id: str = ""
    binary: dict[str, bool] = field(default_factory=dict)  # as in InferRequest (REST only)

    def rest(self) -> tuple[bytes, list[bytes]]:
        """(JSON header, binary chunks); the header is strict JSON (no bare NaN)."""
        outputs, chunks = [], []
        for name, array in self.outputs.items():
            entry: dict[str, Any] = {"name": name, "datatype": datatypes.v2_name(array.dtype),
                                     "shape": list(array.shape)}  # fmt: skip
            if self.binary.get(name, self.binary.get("*", False)):
                raw = np.ascontiguousarray(array).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = json_values(array)
            outputs.append(entry)
        body: dict[str, Any] = {"model_name": self.model, "model_version": self.version, "outputs": outputs}
        if self.id:
            body["id"] = self.id
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), chunks

    def grpc(self, pb: Any) -> Any:
        """A ``ModelInferResponse`` (``pb``: the generated protocol module); tensors as raw contents."""
        response = pb.ModelInferResponse(model_name=self.model, model_version=self.version, id=self.id)
        for name, array in self.outputs.items():
            response.outputs.add(name=name, datatype=datatypes.v2_name(array.dtype), shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response


# --- the request against the model's config --------------------------------------------------------


def validate(spec: ModelSpec, inputs: Tensors, outputs: list[str]) -> list[str]:
    """Validate input names, dtypes and shapes and output names against ``spec``'s config; return the
    outputs to compute (every declared one when ``outputs`` is empty)."""
    declared = {t.name: t for t in spec.inputs}
    missing = [n for n in declared if n not in inputs]
    extra = [n for n in inputs if n not in declared]
    if missing or extra:
        raise bad_request(f"model {spec.name} expects inputs {sorted(declared)}; missing {missing}, unknown {extra}")
    rows = None
    for name, array in inputs.items():
        t = declared[name]
        if datatypes.v2_name(array.dtype) != t.datatype:
            raise bad_request(f"input {name} must be {t.datatype}, got {datatypes.v2_name(array.dtype)}")
        shape = array.shape[1:] if spec.batching else array.shape
        if spec.batching:
            if array.ndim == 0 or array.shape[0] < 1 or array.shape[0] > spec.max_batch_size:
                raise bad_request(f"input {name}: batch size must be 1..{spec.max_batch_size}, shape {array.shape}")
            if rows is not None and array.shape[0] != rows:
                raise bad_request("all inputs must have the same batch size")
            rows = array.shape[0]
        if len(shape) != len(t.dims) or any(d != -1 and d != s for d, s in zip(t.dims, shape, strict=False)):
            expected = [-1, *t.dims] if spec.batching else list(t.dims)
            raise bad_request(f"input {name} has shape {list(array.shape)}, the model expects {expected}")
    known = [t.name for t in spec.outputs]
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise bad_request(f"model {spec.name} has no output(s) {unknown} (outputs: {known})")
    return outputs or known


# --- tensors (both transports) ----------------------------------------------------------------------


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes) or len(shape) > MAX_RANK:
        raise bad_request(f"input {name}: 'shape' must be a list of at most {MAX_RANK} integers")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM:
            raise bad_request(f"input {name}: shape {list(shape)} must hold integers 0..{MAX_DIM}")
    return [int(d) for d in shape]


def check_dtype(name: str, datatype: Any) -> np.dtype:
    if not isinstance(datatype, str):
        raise bad_request(f"input {name}: 'datatype' must be a string such as \"FP32\"")
    try:
        return datatypes.numpy_dtype(datatype)
    except UsageError as exc:
        raise bad_request(f"input {name}: {exc}") from None


def tensor(name: str, datatype: Any, shape: Any, *, raw: bytes | memoryview | None = None,
           values: Any = None) -> np.ndarray:  # fmt: skip
    """An input tensor from raw little-endian bytes or (nested) JSON/protobuf values, checked to fill
    ``shape`` exactly. Sizes are computed with Python integers, so huge dims cannot wrap around."""
    dtype, dims = check_dtype(name, datatype), check_shape(name, shape)
    count = math.prod(dims)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise bad_request(f"input {name}: {len(raw)} bytes of data do not match shape {dims} of {datatype}")
        return np.frombuffer(raw, dtype=dtype).reshape(dims)
    try:
        array = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_request(f"input {name}: the data are not {datatype} values ({exc})") from None
    if array.size != count:
        raise bad_request(f"input {name}: {array.size} values do not fill shape {dims}")
    return array.reshape(dims)


def add_input(arrays: dict[str, np.ndarray], name: Any, array_of: Any) -> None:
    if not isinstance(name, str) or not name:
        raise bad_request("each input needs a non-empty 'name'")
    if name in arrays:
        raise bad_request(f"input {name} is given twice")
    arrays[name] = array_of(name)


def check_outputs(names: list[Any]) -> list[str]:
    if any(not isinstance(n, str) or not n for n in names):
        raise bad_request("each requested output needs a non-empty 'name'")
    if len(set(names)) != len(names):
        raise bad_request(f"requested outputs {names} name an output twice")
    return names


# --- REST (JSON + Triton's binary tensor extension) -------------------------------------------------


def _object(value: Any, what: str) -> dict[str, Any]:
    """An optional JSON object field (absent = empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"{what} parameter {key!r} must be true or false")
    return value


def parse_json(text: bytes | memoryview, what: str = "the request") -> Any:
    """Strict JSON within size and depth limits (:func:`loads_bounded`), every failure a 400."""
    try:
        return loads_bounded(text, max_bytes=len(text), max_depth=MAX_JSON_DEPTH, what=what)
    except JSONLimitError as exc:
        raise bad_request(str(exc)) from None


def decode_rest(body: bytes, header_length: str | None) -> InferRequest:
    """A REST inference request: JSON, optionally followed by binary tensor data whose JSON length is
    given by the ``Inference-Header-Content-Length`` header."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        if not header_length.strip().isdigit():
            raise bad_request(f"{HEADER_LENGTH} must be a non-negative integer")
        n = int(header_length)
        if n > len(body):
            raise bad_request(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        json_part, binary = view[:n], view[n:]
    request = parse_json(json_part)
    if not isinstance(request, dict):
        raise bad_request("the request must be a JSON object")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise bad_request("the request 'id' must be a string")
    default_binary = _flag(_object(request.get("parameters"), "the request 'parameters'"), "binary_data_output",
                           False, "the request's")  # fmt: skip
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad_request("the request needs a non-empty 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        if not isinstance(item, dict):
            raise bad_request("each input must be a JSON object")

        def decode(name: str, item: dict[str, Any] = item) -> np.ndarray:
            nonlocal offset
            size = _object(item.get("parameters"), f"input {name} 'parameters'").get("binary_data_size")
            if size is None:
                if "data" not in item:
                    raise bad_request(f"input {name} has neither 'data' nor binary data")
                return tensor(name, item.get("datatype"), item.get("shape"), values=item["data"])
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise bad_request(f"input {name}: binary_data_size {size!r} is not within the "
                                  f"{len(binary) - offset} bytes of binary data left")  # fmt: skip
            array = tensor(name, item.get("datatype"), item.get("shape"), raw=binary[offset : offset + size])
            offset += size
            return array

        add_input(arrays, item.get("name"), decode)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad_request("'outputs' must be a list of JSON objects")
    names = check_outputs([o.get("name") for o in outputs])
    binary_out = {"*": default_binary}
    for name, o in zip(names, outputs, strict=True):
        parameters = _object(o.get("parameters"), f"output {name} 'parameters'")
        binary_out[name] = _flag(parameters, "binary_data", default_binary, f"output {name}'s")
        if "classification" in parameters:
            raise bad_request(f"output {name}: the classification extension is not supported")
    return InferRequest(arrays, names, binary_out, request_id)


def json_values(array: np.ndarray) -> list[Any]:
    """Tensor values for a JSON response: numbers, with non-finite floats as "NaN"/"Infinity"/"-Infinity"."""
    flat = array.ravel()
    if flat.dtype.kind != "f" or np.isfinite(flat).all():
        return flat.tolist()  # type: ignore[no-any-return]
    out = flat.astype(object)
    out[np.isnan(flat)] = "NaN"
    out[np.isposinf(flat)] = "Infinity"
    out[np.isneginf(flat)] = "-Infinity"
    return out.tolist()  # type: ignore[no-any-return]


# --- gRPC -------------------------------------------------------------------------------------------


def decode_grpc(request: Any) -> InferRequest:
    """A ``ModelInferRequest``: tensors in ``raw_input_contents`` (one per input) or typed ``contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if not request.inputs:
        raise bad_request("the request has no inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):

        def decode(name: str, i: int = i, t: Any = t) -> np.ndarray:
            if raw:
                if t.HasField("contents"):
                    raise bad_request(f"input {name}: data in both raw_input_contents and contents")
                return tensor(name, t.datatype, list(t.shape), raw=raw[i])
            contents = datatypes.CONTENTS_FIELD.get(t.datatype)
            if contents is None:
                check_dtype(name, t.datatype)  # unknown types get the same message as over REST
                raise bad_request(f"input {name}: {t.datatype} must be sent as raw_input_contents")
            return tensor(name, t.datatype, list(t.shape), values=list(getattr(t.contents, contents)))

        add_input(arrays, t.name, decode)
    return InferRequest(arrays, check_outputs([o.name for o in request.outputs]), id=request.id)


def runtime_refusal(exc: Exception) -> ServeError | None:
    """A 400 when a framework refused the *input* (ONNX Runtime's ``InvalidArgument``, TensorFlow's
    ``InvalidArgumentError``): values that pass the config's checks but not the model's (e.g. an image
    smaller than a kernel). ONNX Runtime's first line names shapes only and is passed on; TensorFlow's may
    quote tensor values, so only its kind is. Other failures stay server errors."""
    kind = type(exc).__name__
    if kind == "InvalidArgument":
        return bad_request(f"the model refused the input: {str(exc).splitlines()[0][:300] if str(exc) else kind}")
    if kind == "InvalidArgumentError":
        return bad_request(f"the model refused the input ({kind})")
    return None
