"""``modelseal.onnx``: ONNX Runtime sessions from sealed ONNX models, from memory only.

Accepts a bundle holding one ``.onnx`` file, a bundle of a directory (the ``.onnx`` plus its external
data files), or a sealed directory. Models with external data are supported without a filesystem: the
external tensors are decrypted into memory and handed to ONNX Runtime with
``SessionOptions.add_external_initializers`` (ORT copies them, so peak memory is about twice the
weights; our copies are wiped once the session exists).
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ORT writes a telemetry DB under ~/.cache otherwise

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import FormatError, MissingDependencyError, UsageError
from modelseal.load.bundles import read_all
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
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("this needs ONNX Runtime: pip install 'modelseal[onnx]'") from None
    files = read_all(Path(path), identity=identity, trusted_signers=trusted_signers)
    try:
        models = [n for n in files if n.endswith(".onnx")]
        if len(files) == 1 and not models:
            models = list(files)
        if len(models) != 1:
            raise UsageError(f"{path} must hold exactly one .onnx model, found {len(models)}")
        model_name = models[0]
        opts = sess_options or ort.SessionOptions()
        base = str(Path(model_name).parent)
        external = _external_initializers(files[model_name], files, "" if base == "." else base + "/", str(path))
        if external:
            opts.add_external_initializers(
                list(external), [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()]
            )
        try:
            return ort.InferenceSession(
                bytes(files[model_name]),
                sess_options=opts,
                providers=list(providers or ["CPUExecutionProvider"]),
                **kwargs,
            )
        except Exception as exc:  # ORT raises its own exception types for invalid models
            raise FormatError(f"{path}: ONNX Runtime cannot load the decrypted model: {str(exc)[:200]}") from None
    finally:
        for data in files.values():
            keys.wipe(data)


def _external_initializers(model: bytearray, files: dict[str, bytearray], base: str, source: str) -> dict[str, Any]:
    """Numpy views over the decrypted external-data files, by initializer name."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        raise MissingDependencyError(
            "models with external data need the onnx package: pip install 'modelseal[onnx]'"
        ) from None
    import numpy as np
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(bytes(model))  # never reads external data itself
    except DecodeError:
        raise FormatError(f"{source}: the decrypted model is not a valid ONNX protobuf") from None
    out: dict[str, Any] = {}
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        name = base + info.get("location", "")
        if name not in files:
            raise FormatError(f"{source}: external data file {info.get('location')!r} of {init.name!r} is missing")
        dtype = np.dtype(tensor_dtype_to_np_dtype(init.data_type))
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        offset = int(info.get("offset", 0))
        length = int(info.get("length", count * dtype.itemsize))
        if length != count * dtype.itemsize or offset + length > len(files[name]):
            raise FormatError(f"{source}: external data of {init.name!r} does not match its shape")
        out[init.name] = np.frombuffer(files[name], dtype=dtype, count=count, offset=offset).reshape(tuple(init.dims))
    return out
