"""``modelseal.openvino``: OpenVINO models from sealed artifacts, read and compiled from memory only.

A sealed OpenVINO IR is the IR's directory (``model.xml`` and its weights ``model.bin``, same stem)
sealed as a sealed directory or a bundle of one; a sealed ONNX model is a bundle (or sealed directory)
holding one ``.onnx`` whose weights are inside it. :func:`read_model` gives an ``openvino.Model``,
:func:`compile_model` an ``openvino.CompiledModel``; plain (unsealed) files and directories load too,
from their path, the way OpenVINO always reads them.

How a sealed model reaches OpenVINO without a file: the XML (or the ONNX protobuf) is passed as our
decrypted ``bytearray`` to ``Core.read_model(model, weights)``, whose binding copies it into a C++
string (no immutable Python copy is made); the IR's weights are copied into a tensor OpenVINO allocates
(``openvino.Tensor``), which the model's constants then point into. Our decrypted buffers are wiped as
soon as ``read_model`` returns.

What stays in OpenVINO's memory, freed (not wiped) when the model is dropped: the weights tensor above,
shared by the ``Model``'s constants and, where the CPU plugin can, by the compiled model; the copies the
plugin makes when it compiles (weights repacked into its own layouts); for ONNX, the constants the ONNX
frontend builds from the protobuf. The C++ copy of the XML or ONNX bytes and the XML parser's document
are freed when ``read_model`` returns. ``modelseal serve`` (:mod:`modelseal.serve.runtimes.openvino`)
also zeroes the weights tensor when it unloads a model. An ONNX model is first parsed by the ``onnx``
package to check that no tensor keeps its data in an external file (see :func:`_check_onnx`); that
protobuf copy is freed, not wiped, when the check ends.

What OpenVINO would write, and how it is kept from it (``tests/test_openvino.py`` audits a load):

* ``import openvino`` imports its conversion tools, which start the ``openvino-telemetry`` package: it
  writes a client id and counters under ``~/intel`` and sends an event over the network. Importing this
  module first makes ``openvino_telemetry`` unimportable in the process (``sys.modules`` entry ``None``),
  and OpenVINO then uses its own no-op stub. A program that imported ``openvino_telemetry`` (or
  ``openvino``) before keeps its telemetry: that was its choice.
* The model cache (``CACHE_DIR``) would store the compiled model, weights included, on disk: this
  module's ``Core`` never sets it, and a ``config`` that sets it is refused.
* ``OV_ENABLE_SERIALIZE_TRACING`` (every transformation's model, ``.xml`` + ``.bin``, into the working
  directory), ``OV_ENABLE_VISUALIZE_TRACING`` (graph dumps) and ``OV_ENABLE_PROFILE_PASS`` (timings, to a
  file it may name) are read by OpenVINO's release builds while a model compiles: a sealed load refuses
  to run while any is set.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from modelseal.crypto import keys
from modelseal.errors import FormatError, MissingDependencyError, SignatureError, UsageError
from modelseal.format.bundle import is_bundle
from modelseal.load.bundles import read_all
from modelseal.recipients.registry import IdentitySpec

# before anything imports openvino (none of the imports above does): OpenVINO's conversion tools, which
# ``import openvino`` imports, fall back to their no-op telemetry stub when this cannot be imported
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

# environment variables that make OpenVINO write files while it transforms a model
TRACING_VARIABLES = ("OV_ENABLE_SERIALIZE_TRACING", "OV_ENABLE_VISUALIZE_TRACING", "OV_ENABLE_PROFILE_PASS")
_OFF = ("", "0", "false", "off", "no")
_T = TypeVar("_T")
_core: Any = None
_core_lock = threading.Lock()


def read_model(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """``openvino.Model`` of a sealed (or plain) IR or ONNX model.

    The model is yours: compiling it with a ``CACHE_DIR`` (or tracing variables set) of your own Core
    writes it to disk; :func:`compile_model` refuses both."""
    model, _weights = load(path, identity=identity, trusted_signers=trusted_signers)
    return model


def compile_model(
    path: str | os.PathLike[str],
    device: str = "CPU",
    *,
    identity: IdentitySpec | None = None,
    config: Mapping[str, Any] | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """``openvino.CompiledModel`` of a sealed (or plain) IR or ONNX model for ``device``; ``config``
    holds OpenVINO properties (``INFERENCE_NUM_THREADS``...), never ``CACHE_DIR``."""
    check_config(config)
    model, _weights = load(path, identity=identity, trusted_signers=trusted_signers)
    return compile_loaded(model, device, config, str(path))


def load(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> tuple[Any, Any | None]:
    """(``openvino.Model``, the OpenVINO tensor holding a sealed IR's weights or None) for ``path``:
    sealed when it is a sealed bundle or a directory holding one, else read by OpenVINO from the path.
    With ``trusted_signers`` a plain model is refused."""
    openvino()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not is_sealed(path):
        if trusted_signers:
            raise SignatureError(f"{path} is not sealed, so it cannot carry a trusted signer's signature")
        return read_plain(path), None
    files = read_all(path, identity=identity, trusted_signers=trusted_signers)
    try:
        return model_from_files(files, str(path))
    finally:
        for data in files.values():
            keys.wipe(data)


def is_sealed(path: Path) -> bool:
    """Whether ``path`` is a sealed bundle, or a directory holding one (a sealed directory)."""
    if path.is_dir():
        return any(is_bundle(p) for p in path.rglob("*") if p.is_file())
    return is_bundle(path)


def model_from_files(files: Mapping[str, bytearray], source: str) -> tuple[Any, Any | None]:
    """(``openvino.Model``, weights tensor or None) from a model's decrypted files ({relative name:
    content}: an IR's ``.xml`` and ``.bin``, or one ``.onnx``); the caller wipes them, which is safe as
    soon as this returns. The weights tensor (IR only) is OpenVINO's memory the model's constants live
    in: zero it (``weights.data.fill(0)``) once the model and everything compiled from it are dropped.
    ``source`` names the model in errors."""
    ov = openvino()
    refuse_tracing()
    name, kind = _pick(files, source)
    data, what = files[name], f"{source}: OpenVINO cannot read {name}"
    if kind == "onnx":
        _check_onnx(data, source)
        empty = ov.Tensor(ov.Type.u8, [0])
        model = _openvino_call(lambda: _core_instance().read_model(data, empty), what)
        return model, None
    stem = name[: -len(".xml")] if name.endswith(".xml") else name
    weights_name = stem + ".bin"
    if weights_name not in files:
        raise FormatError(
            f"{source} holds the IR {name} but not its weights {weights_name}: seal the IR's directory "
            "(the .xml and the .bin together)"
        )
    if not _looks_like_xml(data):
        raise FormatError(f"{source}: {name} is not an OpenVINO IR (not XML)")
    import numpy as np

    raw = files[weights_name]
    weights = ov.Tensor(ov.Type.u8, [len(raw)])  # OpenVINO's own memory: our buffer can be wiped at once
    if len(raw):
        np.copyto(weights.data, np.frombuffer(raw, np.uint8))
    try:
        model = _openvino_call(lambda: _core_instance().read_model(data, weights), what)
    except BaseException:
        weights.data.fill(0)
        raise
    return model, weights


def read_plain(path: Path) -> Any:
    """``openvino.Model`` of a plain model file, or of the one ``.xml`` or ``.onnx`` in a plain
    directory, read by OpenVINO from its path (an IR's ``.bin`` beside its ``.xml``)."""
    target = path
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in (".xml", ".onnx") and p.is_file())
        if len(found) != 1:
            raise UsageError(f"{path} must hold exactly one model (.xml or .onnx), found {len(found)}")
        target = found[0]
    if not stat.S_ISREG(target.stat().st_mode):  # OpenVINO's open would block on a FIFO for good
        raise FormatError(f"{target} is not a regular file (a FIFO or device cannot be a model file)")
    if target.suffix == ".xml" and not target.with_suffix(".bin").is_file():
        raise FormatError(f"{target} has no weights file {target.with_suffix('.bin').name} beside it")
    return _openvino_call(lambda: _core_instance().read_model(str(target)), f"{target}: OpenVINO cannot read it")


def compile_loaded(model: Any, device: str, config: Mapping[str, Any] | None, source: str) -> Any:
    """``Core.compile_model`` of ``model`` on this module's Core (no cache), as a one-line error."""
    check_config(config)
    refuse_tracing()
    return _openvino_call(
        lambda: _core_instance().compile_model(model, device, dict(config or {})),
        f"{source}: OpenVINO cannot compile the model for {device}",
        UsageError,
    )


def check_config(config: Mapping[str, Any] | None) -> None:
    """Refuse a compile ``config`` that would make OpenVINO write the model to disk (its model cache)."""
    for key, value in (config or {}).items():
        if str(key).upper() == "CACHE_DIR" and str(value):
            raise UsageError("CACHE_DIR would make OpenVINO store the compiled model, weights included, on disk")


def refuse_tracing() -> None:
    """Refuse while an OpenVINO tracing variable is set: its passes would dump the decrypted model."""
    for name in TRACING_VARIABLES:
        if os.environ.get(name, "").strip().lower() not in _OFF:
            raise UsageError(f"${name} is set: OpenVINO would write the decrypted model (or its graph) to files; "
                             "unset it to load sealed models")  # fmt: skip


def openvino() -> Any:
    """The ``openvino`` package (its telemetry kept off by this module's import)."""
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("this needs OpenVINO: pip install 'modelseal[openvino]'") from None
    return ov


def _core_instance() -> Any:
    """The process's one ``openvino.Core`` for modelseal: no cache directory is ever set on it. Its
    plugins load once; a Core is safe to share between threads."""
    global _core
    with _core_lock:
        if _core is None:
            _core = openvino().Core()
        return _core


def _pick(files: Mapping[str, bytearray], source: str) -> tuple[str, str]:
    """(name, "ir" or "onnx") of the one model among the decrypted files. A single file of another name
    is told by its content (XML or not)."""
    irs = [n for n in files if n.endswith(".xml")]
    onnxs = [n for n in files if n.endswith(".onnx")]
    if len(irs) + len(onnxs) == 1:
        return (irs[0], "ir") if irs else (onnxs[0], "onnx")
    if not irs and not onnxs and len(files) == 1:
        name = next(iter(files))
        return name, "ir" if _looks_like_xml(files[name]) else "onnx"
    raise FormatError(f"{source} must hold exactly one model (an IR's .xml or one .onnx), "
                      f"found {len(irs) + len(onnxs)}")  # fmt: skip


def _looks_like_xml(data: bytearray) -> bool:
    """Whether ``data`` starts like an XML document (only its first bytes are looked at, and copied)."""
    return bytes(memoryview(data)[:256]).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _check_onnx(data: bytearray, source: str) -> None:
    """Refuse an ONNX model that is not a valid protobuf, or with any tensor whose data is external.

    Given a model from memory, OpenVINO's ONNX frontend reads an external tensor's ``location``
    relative to the process's working directory (or as an absolute path): the server's own files, not
    the model's sealed ones. A sealed ONNX model for OpenVINO keeps its weights inside the ``.onnx``
    (or is converted to IR)."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("sealed ONNX models on OpenVINO are checked with the onnx package: "
                                     "pip install onnx") from None  # fmt: skip
    from google.protobuf.message import DecodeError

    from modelseal.onnx import _tensors  # one walk over every tensor of a model, subgraphs included

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(memoryview(data))
    except DecodeError:
        raise FormatError(f"{source}: the decrypted model is not a valid ONNX protobuf") from None
    if not proto.HasField("graph"):
        raise FormatError(f"{source}: the decrypted model is not an ONNX model (no graph)")
    for where, tensor in _tensors(proto, "", onnx.TensorProto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            what = f"tensor {tensor.name!r} ({where})" if tensor.name else f"tensor {where}"
            raise FormatError(f"{source}: {what} keeps its data in an external file, which OpenVINO would read "
                              "from the working directory: save the ONNX model with its weights inside, or "
                              "convert it to OpenVINO IR, before sealing")  # fmt: skip


def _openvino_call(call: Callable[[], _T], what: str, error: type[Exception] = FormatError) -> _T:
    """``call()``, with an OpenVINO exception turned into one line: ``what`` and the reason OpenVINO
    gives (its messages run over several lines of source locations and failed checks)."""
    try:
        return call()
    except Exception as exc:  # OpenVINO raises RuntimeError (and a few of its own) for every failure
        raise error(f"{what}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO error: the last one that is not a source location."""
    skip = ("Exception from ", "Check '", "FrontEnd API failed")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(skip)]
    text = (useful or lines or [type(exc).__name__])[-1]
    return text[:300]
