"""``modelseal.onnx``: ONNX Runtime sessions from sealed ONNX models, from memory only.

Accepts a bundle holding one ``.onnx`` file, a bundle of a directory (the ``.onnx`` plus its external
data files), or a sealed directory. Models with external data are supported without a filesystem: the
external tensors are decrypted into memory and handed to ONNX Runtime with
``SessionOptions.add_external_initializers`` (ORT copies them, so peak memory is about twice the
weights; our copies are wiped once the session exists).

What stays in memory: ONNX Runtime's session holds its own copy of the graph and weights, which it
frees (does not wipe) when the session is dropped. The decrypted files are in our buffers, wiped once the
session exists; the model itself reaches ONNX Runtime through an anonymous memory file, zeroed and
closed right after (see :func:`_memory_file`), not as an immutable ``bytes`` -- except where the system
has no ``memfd_create`` (not Linux): there ORT gets a ``bytes`` copy of the graph and keeps it for the
session's life, and no wipe reaches it. The graph is also parsed
by the ``onnx`` package to find its external tensors: that protobuf copy (with the weights stored inside
the graph) is freed, not wiped, as soon as the session exists.
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ORT writes a telemetry DB under ~/.cache otherwise

import contextlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import FormatError, MissingDependencyError, UsageError
from modelseal.format import schema
from modelseal.load.bundles import read_all
from modelseal.memory.memfd import write_memory_file, zero_and_close
from modelseal.recipients.registry import IdentitySpec


def InferenceSession(  # noqa: N802 - mirrors onnxruntime.InferenceSession
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    providers: Sequence[Any] | None = None,
    sess_options: Any = None,
    trusted_signers: Sequence[str] | None = None,
    **kwargs: Any,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a sealed ONNX model."""
    _onnxruntime()
    files = read_all(Path(path), identity=identity, trusted_signers=trusted_signers)
    try:
        return session_from_files(files, str(path), providers=providers, sess_options=sess_options, **kwargs)
    finally:
        for data in files.values():
            keys.wipe(data)


def session_from_files(
    files: Mapping[str, bytearray],
    source: str,
    *,
    providers: Sequence[Any] | None = None,
    sess_options: Any = None,
    **kwargs: Any,
) -> Any:
    """An ``onnxruntime.InferenceSession`` from a model's decrypted files ({relative name: content}: one
    ``.onnx`` and its external data files); the caller wipes them. ``source`` names the model in errors."""
    ort = _onnxruntime()
    models = [n for n in files if n.endswith(".onnx")]
    if len(files) == 1 and not models:
        models = list(files)
    if len(models) != 1:
        raise UsageError(f"{source} must hold exactly one .onnx model, found {len(models)}")
    model_name = models[0]
    opts = sess_options or ort.SessionOptions()
    base = str(Path(model_name).parent)
    external = _external_initializers(files[model_name], files, "" if base == "." else base + "/", source)
    if external:
        opts.add_external_initializers(list(external), [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()])
    try:
        with _memory_file(files[model_name]) as model_path:
            return ort.InferenceSession(
                model_path, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]), **kwargs
            )
    except Exception as exc:  # ORT raises its own exception types for invalid models
        raise FormatError(f"{source}: ONNX Runtime cannot load the decrypted model: {str(exc)[:200]}") from None


def _onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("this needs ONNX Runtime: pip install 'modelseal[onnx]'") from None
    return ort


@contextlib.contextmanager
def _memory_file(data: bytearray) -> Iterator[str | bytes]:
    """A path to a copy of ``data`` in an anonymous memory file (``memfd_create``: never on a disk),
    zeroed and closed on exit.

    Why not pass the bytes: ``onnxruntime.InferenceSession`` accepts a model only as a path or as
    ``bytes``, and keeps a ``bytes`` model referenced for the session's whole life (to rebuild it on a
    provider fallback), so the decrypted graph would sit in an immutable object no wipe can reach for as
    long as the model is served. Given a path, ONNX Runtime reads the file into its own memory. Where
    there is no ``memfd_create`` (not Linux), it gets that ``bytes`` copy all the same (documented in
    docs/serving.md, "What stays in memory")."""
    if not hasattr(os, "memfd_create"):
        yield bytes(data)
        return
    fd = write_memory_file("modelseal-model", data)  # a failed copy is zeroed and closed there
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        zero_and_close(fd, len(memoryview(data).cast("B")))


def _external_initializers(model: bytearray, files: Mapping[str, bytearray], base: str, source: str) -> dict[str, Any]:
    """Numpy views over the decrypted external-data files, by initializer name (ONNX Runtime copies
    them into the session; ours are wiped by the caller).

    Every tensor of the model is checked, not only the main graph's initializers: ONNX Runtime reads any
    other tensor with external data (a Constant node's value, a subgraph's initializer, a sparse tensor)
    from a file it resolves against the model's directory -- ``/proc/self/fd`` for our memory file, so
    ``location: "5"`` is whatever the server has open as descriptor 5 (another model's decrypted memory
    file), and for a ``bytes`` model the working directory. Only the main graph's initializers are handed
    over from memory, and only from the model's own sealed files; any other external tensor is refused."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        raise MissingDependencyError(
            "models with external data need the onnx package: pip install 'modelseal[onnx]'"
        ) from None
    import numpy as np
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:  # parsed from our buffer (no bytes copy); never reads external data itself
        proto.ParseFromString(memoryview(model))
    except DecodeError:
        raise FormatError(f"{source}: the decrypted model is not a valid ONNX protobuf") from None
    names = Counter(t.name for t in proto.graph.initializer)
    out: dict[str, Any] = {}
    for where, init in _tensors(proto, "", onnx.TensorProto):
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        what = f"tensor {init.name!r} ({where})" if init.name else f"tensor {where}"
        if not re.fullmatch(r"graph\.initializer\[\d+\]", where) or names[init.name] != 1:
            raise FormatError(
                f"{source}: {what} keeps its data outside the model ({info.get('location', '')[:80]!r}); "
                "only the main graph's uniquely named initializers may, in the model's sealed files"
            )
        location = schema.relpath(info.get("location", ""), f"{source}: external data of {what}")
        name = base + location
        if name not in files:
            raise FormatError(f"{source}: external data file {location[:80]!r} of {init.name!r} is missing")
        dtype = np.dtype(tensor_dtype_to_np_dtype(init.data_type))
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        offset = int(info.get("offset", 0))
        length = int(info.get("length", count * dtype.itemsize))
        if length != count * dtype.itemsize or offset + length > len(files[name]):
            raise FormatError(f"{source}: external data of {init.name!r} does not match its shape")
        out[init.name] = np.frombuffer(files[name], dtype=dtype, count=count, offset=offset).reshape(tuple(init.dims))
    return out


def _tensors(message: Any, where: str, tensor_type: type) -> Iterator[tuple[str, Any]]:
    """Every ``tensor_type`` (``onnx.TensorProto``) anywhere inside the protobuf ``message``, with its
    field path (``graph.node[3].attribute[0].t``).

    A walk over the message's set fields rather than a list of the places tensors live: onnx's own
    helper for this is private and misses sparse tensors, and a field a later ONNX version adds (or
    one we did not think of: functions, training info) is covered all the same."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        path = f"{where}.{field.name}" if where else field.name
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)] if _repeated(field) else [(path, value)]
        for at, item in items:
            if isinstance(item, tensor_type):
                yield at, item
            else:
                yield from _tensors(item, at, tensor_type)


def _repeated(field: Any) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` from protobuf 6, where ``label`` warns)."""
    return bool(field.is_repeated) if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
