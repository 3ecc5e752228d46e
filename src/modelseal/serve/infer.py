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

Data types (:mod:`.datatypes`): ``BYTES`` tensors are numpy object arrays of ``bytes`` in the server; in
JSON they are strings (UTF-8), in REST binary data and gRPC raw contents Triton's length-prefixed form
(each element a 4-byte little-endian length, then its bytes: :func:`encode_bytes`, :func:`decode_bytes`),
in gRPC typed contents ``bytes_contents``. ``BF16`` (``ml_dtypes.bfloat16``) travels as binary data only,
2 bytes an element, as in Triton; in JSON it is refused both ways. ``FP16`` travels in JSON as numbers
(Triton refuses that; tritonclient sends it), and in gRPC as raw contents only (no typed field).
"""

from __future__ import annotations

import json
import math
import struct
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
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics",
              "metrics"]  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_DEPTH = 40  # a request is ~4 levels plus one per tensor dimension when data is sent nested
MAX_RANK = 32
MAX_DIM = 2**31 - 1
MAX_SPAN = 2**48  # the product of a shape's dims, zeros counted as ones
LENGTH = struct.Struct("<I")  # the length prefix of each BYTES element in binary form


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
    classification: dict[str, int] = field(default_factory=dict)  # output name -> top classes to answer

    def validate(self, spec: ModelSpec) -> list[str]:
        """Check the request against ``spec``'s config; the outputs to compute."""
        return validate(spec, self.inputs, self.outputs)

    def respond(self, model: str, version: str, results: Tensors, spec: ModelSpec | None = None,
                labels: dict[str, list[str]] | None = None) -> InferResponse:  # fmt: skip
        """The response to this request: its id, REST's binary choices for each output, and the outputs
        asked for as classifications turned into them (``spec``: the model's config, ``labels``: its class
        labels by output)."""
        for name, count in self.classification.items():
            batching = spec.batching if spec is not None else False
            results[name] = classify(name, results[name], count, (labels or {}).get(name, []), batching)
        return InferResponse(model, version, results, self.id, self.binary)


MAX_CLASSES = 1 << 16
MAX_BYTES_ELEMENTS = 1 << 20  # BYTES elements per request (each becomes a Python object while decoded)


def classification_count(name: str, value: Any) -> int:
    """An output's ``classification`` parameter: how many top classes to answer (1..65536)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_CLASSES:
        raise bad_request(f"output {name}: 'classification' must be an integer 1..{MAX_CLASSES}")
    return value


def classify(name: str, array: np.ndarray, count: int, labels: list[str], batching: bool) -> np.ndarray:
    """The classification extension (Triton's): the ``count`` largest values of each row (each batch
    entry; the whole tensor without batching) as BYTES ``"value:index"``, or ``"value:index:label"`` when
    the config's ``label_filename`` names that index, largest first."""
    if array.dtype.kind not in "biuf":
        raise bad_request(f"output {name}: classification needs a numeric output, not {datatypes.v2_name(array.dtype)}")
    rows = array.reshape(array.shape[0] if batching and array.ndim else 1, -1)
    top = min(count, rows.shape[1])
    classes = np.empty((rows.shape[0], top), dtype=object)
    for r, row in enumerate(rows):
        values = -row.astype(np.float64)
        chosen = np.argpartition(values, top - 1)[:top] if 0 < top < len(values) else np.arange(len(values))
        for j, index in enumerate(chosen[np.lexsort((chosen, values[chosen]))]):  # largest first, then by index
            label = f":{labels[index]}" if index < len(labels) and labels[index] else ""
            classes[r, j] = f"{float(row[index]):f}:{index}{label}".encode()
    return classes if batching and array.ndim else classes[0]


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
            datatype = datatypes.v2_name(array.dtype)
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if self.binary.get(name, self.binary.get("*", False)):
                raw = raw_bytes(array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                if datatype == "BF16":
                    raise bad_request(f"output {name}: BF16 data cannot be sent as JSON; request it as binary "
                                      "data (output parameter binary_data: true)")  # fmt: skip
                entry["data"] = json_values(array, name)
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
            response.raw_output_contents.append(raw_bytes(array))
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
    if math.prod(max(int(d), 1) for d in shape) > MAX_SPAN:  # an empty [0, 2**31, 2**31, 2**31] too:
        raise bad_request(f"input {name}: shape {list(shape)} is too large")  # numpy cannot even reshape to it
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
    """An input tensor from raw little-endian bytes (``BYTES``: length-prefixed elements) or (nested)
    JSON/protobuf values, checked to fill ``shape`` exactly. Sizes are computed with Python integers, so
    huge dims cannot wrap around."""
    dtype, dims = check_dtype(name, datatype), check_shape(name, shape)
    count = math.prod(dims)
    if raw is not None:
        if datatype == "BYTES":
            return decode_bytes(raw, count, name, dims).reshape(dims)
        if len(raw) != count * dtype.itemsize:
            raise bad_request(f"input {name}: {len(raw)} bytes of data do not match shape {dims} of {datatype}")
        if datatype == "BOOL" and count and np.frombuffer(raw, dtype=np.uint8).max() > 1:
            raise bad_request(f"input {name}: BOOL data hold a byte other than 0 and 1")  # not a numpy bool
        return np.frombuffer(raw, dtype=dtype).reshape(dims)
    if datatype == "BYTES":
        array = _byte_values(name, values)
    else:
        try:
            _check_value_types(name, datatype, dtype, values)
            with np.errstate(over="raise"):  # 1e39 as FP32, 70000 as FP16: refused, not made infinite
                array = np.asarray(values, dtype=dtype)
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise bad_request(f"input {name}: the data are not {datatype} values ({exc})") from None
    if array.size != count:
        raise bad_request(f"input {name}: {array.size} values do not fill shape {dims}")
    return array.reshape(dims)


def _byte_values(name: str, values: Any) -> np.ndarray:
    """BYTES elements from JSON strings (encoded as UTF-8) or gRPC ``bytes_contents``, flat or nested
    (JSON nesting is bounded by the parser's depth limit)."""
    flat: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, bytes):
            flat.append(value)
        elif isinstance(value, str):
            try:
                flat.append(value.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escape ("\udc80") is not text
                raise bad_request(f"input {name}: BYTES data hold a string that is not valid Unicode") from None
        else:
            raise bad_request(f"input {name}: BYTES data must be strings, not {type(value).__name__}")

    walk(values)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array


NON_FINITE = {"NaN", "Infinity", "-Infinity"}


def _check_value_types(name: str, datatype: str, dtype: np.dtype, values: Any) -> None:
    """JSON values must be of the tensor's kind, not merely convertible: numpy would turn ``"false"``
    into True, ``1.7`` into 1 and ``"5"`` into 5, silently. BOOL takes true/false, integer types take
    integers (or integral numbers), float types take numbers and the strings NaN/Infinity/-Infinity."""
    given = np.asarray(values)
    if given.size == 0:
        return
    kind, want = given.dtype.kind, dtype.kind
    elements = np.asarray(values, dtype=object).ravel().tolist() if kind in "OUiuf" and want != "b" else []
    if kind == "O" and any(v is None for v in (elements or given.ravel().tolist())):
        raise ValueError(f"null is not a {datatype} value")  # numpy would make it NaN
    if kind in "OU" and want == "f":  # strings among the numbers: only the non-finite names
        strings = {v for v in elements if isinstance(v, str)}
        if strings - NON_FINITE or any(isinstance(v, bool) for v in elements):
            raise ValueError(f"only numbers and {sorted(NON_FINITE)} are {datatype} values")
        return
    if want != "b" and kind in "iuf" and any(type(v) is bool for v in elements):
        raise ValueError(f"true/false are not {datatype} values")  # numpy made [True, 2] integers
    fits = {"b": kind == "b", "i": kind in "iu", "u": kind in "iu", "f": kind in "iuf"}.get(want, True)
    if not fits and want in "iu" and kind == "f" and bool(np.all(np.mod(given, 1) == 0)):
        fits = True  # 3.0 for an INT32 is 3
    if not fits:
        raise ValueError(f"JSON {given.dtype.name} values are not {datatype} values")


def decode_bytes(raw: bytes | memoryview, count: int, name: str = "", dims: Any = None) -> np.ndarray:
    """``count`` BYTES elements from Triton's binary form (a 4-byte little-endian length, then that many
    bytes, for each), as a flat object array of ``bytes``. Data that end inside a length or an element,
    or go on after the last, are a 400."""
    view = memoryview(raw).cast("B")
    size = len(view)
    what = f"input {name}" if name else "BYTES data"
    if count * LENGTH.size > size:  # checked first: a huge shape with little data costs nothing
        raise bad_request(f"{what}: {size} bytes of data cannot hold the {count} BYTES elements of shape "
                          f"{dims if dims is not None else [count]} (each takes at least {LENGTH.size})")  # fmt: skip
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if size - offset < LENGTH.size:
            raise bad_request(f"{what}: the data end inside the length of BYTES element {i}")
        (length,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if length > size - offset:
            raise bad_request(f"{what}: BYTES element {i} has length {length}, past the end of the data "
                              f"({size - offset} bytes left)")  # fmt: skip
        out[i] = view[offset : offset + length].tobytes()
        offset += length
    if offset != size:
        raise bad_request(f"{what}: {size - offset} bytes of data follow the last of its {count} BYTES elements")
    return out


def as_bytes(value: Any) -> bytes:
    """One BYTES element as ``bytes``: bytes as they are, text as UTF-8 (what runtimes return)."""
    if isinstance(value, bytes):
        return bytes(value)  # np.bytes_ too
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a BYTES element must be bytes or str, not {type(value).__name__}")


def encode_bytes(array: np.ndarray) -> bytes:
    """Triton's binary form of a BYTES tensor, elements in row-major order (:func:`decode_bytes`)."""
    parts: list[bytes] = []
    for value in array.ravel(order="C"):
        data = as_bytes(value)
        if len(data) > 0xFFFFFFFF:
            raise ValueError("a BYTES element longer than 4 GiB has no length prefix")
        parts += (LENGTH.pack(len(data)), data)
    return b"".join(parts)


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's binary data (REST binary extension, gRPC raw contents): little-endian values, or the
    length-prefixed elements of a BYTES tensor."""
    if array.dtype.kind in "OSU":
        return encode_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def check_bytes_budget(arrays: dict[str, np.ndarray], name: str, datatype: Any, shape: Any) -> None:
    """A request's BYTES tensors hold at most :data:`MAX_BYTES_ELEMENTS` elements in all, checked before
    each is decoded: every element becomes a Python object (about 7 times a short element's bytes, outside
    the in-flight byte budget), and decoding holds the GIL."""
    if datatype != "BYTES":
        return
    held = sum(a.size for a in arrays.values() if a.dtype == object)
    if held + math.prod(check_shape(name, shape)) > MAX_BYTES_ELEMENTS:
        raise bad_request(f"input {name}: the request's BYTES tensors would hold more than {MAX_BYTES_ELEMENTS} "
                          "elements in all")  # fmt: skip


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
        if not (header_length.strip().isascii() and header_length.strip().isdigit()):
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
            check_bytes_budget(arrays, name, item.get("datatype"), item.get("shape"))
            size = _object(item.get("parameters"), f"input {name} 'parameters'").get("binary_data_size")
            if size is None:
                if "data" not in item:
                    raise bad_request(f"input {name} has neither 'data' nor binary data")
                if item.get("datatype") == "BF16":
                    raise bad_request(f"input {name}: BF16 data cannot be sent as JSON; send it as binary data "
                                      "(the binary tensor data extension; tritonclient: binary_data=True)")  # fmt: skip
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
    classes = {}
    for name, o in zip(names, outputs, strict=True):
        parameters = _object(o.get("parameters"), f"output {name} 'parameters'")
        binary_out[name] = _flag(parameters, "binary_data", default_binary, f"output {name}'s")
        if "classification" in parameters:
            classes[name] = classification_count(name, parameters["classification"])
    return InferRequest(arrays, names, binary_out, request_id, classes)


def json_values(array: np.ndarray, name: str = "") -> list[Any]:
    """Tensor values for a JSON response: numbers, with non-finite floats as "NaN"/"Infinity"/"-Infinity";
    BYTES elements as strings, refused (400) when one is not UTF-8 text, which JSON cannot carry."""
    flat = array.ravel()
    if flat.dtype.kind in "OSU":
        try:
            return [v if isinstance(v, str) else as_bytes(v).decode("utf-8") for v in flat.tolist()]
        except UnicodeDecodeError:
            raise bad_request(f"output {name}: BYTES data that are not UTF-8 cannot be sent as JSON; request "
                              "it as binary data (output parameter binary_data: true)") from None  # fmt: skip
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
            check_bytes_budget(arrays, name, t.datatype, list(t.shape))
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
    classes = {o.name: classification_count(o.name, o.parameters["classification"].int64_param)
               for o in request.outputs if "classification" in o.parameters}  # fmt: skip
    return InferRequest(arrays, check_outputs([o.name for o in request.outputs]), id=request.id,
                        classification=classes)  # fmt: skip


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
