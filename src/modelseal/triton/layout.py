"""``modelseal triton-repo``: one model of a Triton repository laid out from a sealed file.

::

    REPO/<name>/config.pbtxt          backend "python"; inputs and outputs completed from the model
    REPO/<name>/1/model.py            ``from modelseal.triton.model import TritonPythonModel`` (or a copy)
    REPO/<name>/1/<the sealed file>   copied as it is: still sealed

The inputs and outputs are what the model itself declares, learnt as ``modelseal serve`` completes a
config (:mod:`modelseal.serve.autocomplete`): the model is decrypted in memory with the identity given,
asked, and wiped; nothing but the sealed file and the two texts above is written. The model directory
appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal import atomicfile
from modelseal.errors import UsageError
from modelseal.load.artifacts import resolve_identity
from modelseal.recipients.registry import IdentitySpec
from modelseal.serve import datatypes
from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
from modelseal.serve.runtimes.base import build, registry
from modelseal.serve.source import open_source
from modelseal.triton.settings import guess_platform

REFERENCE = "from modelseal.triton.model import TritonPythonModel  # noqa: F401 (Triton looks it up here)\n"


@dataclass
class Layout:
    """What ``triton-repo`` is asked to lay out."""

    sealed: Path
    repository: Path
    name: str
    platform: str = ""
    identity: IdentitySpec | None = None  # read the model's inputs and outputs now
    serve_identity: str | None = None  # written as the ``identity`` parameter: how Triton's model gets its key
    max_batch_size: int | None = None  # None: 4 when every tensor has a variable first dim, else 0 (as serve)
    env_path: str = field(default_factory=lambda: sys.prefix)  # EXECUTION_ENV_PATH: has modelseal installed
    key_check_s: float = 5.0
    entry_point: str = ""
    copy_model_py: bool = False
    inputs: tuple[TensorSpec, ...] = ()  # declared by hand (a TorchScript model without example inputs)
    outputs: tuple[TensorSpec, ...] = ()


def tensor_option(text: str) -> TensorSpec:
    """``NAME:DATATYPE:DIMS`` (``x:FP32:3,4``, ``-1`` for a variable dim, batch dimension left out) as a
    :class:`TensorSpec`, for ``--input``/``--output``."""
    name, _, rest = text.partition(":")
    datatype, _, dims = rest.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = (-2,)
    if not name or datatype not in datatypes.NUMPY or any(d < -1 for d in shape):
        raise UsageError(f"{text[:60]!r}: a tensor is NAME:DATATYPE:DIMS, e.g. input:FP32:3,224,224")
    return TensorSpec(name, datatype, shape)


def _config_text(spec: ModelSpec, layout: Layout, file_name: str) -> str:
    def tensors(items: tuple[TensorSpec, ...]) -> str:
        rows = [f'  {{ name: "{t.name}" data_type: TYPE_{t.datatype} dims: [ {", ".join(map(str, t.dims))} ] }}'
                for t in items]  # fmt: skip
        return ",\n".join(rows)

    params = {"EXECUTION_ENV_PATH": layout.env_path, "platform": spec.platform}
    params["key_check_s"] = f"{layout.key_check_s:g}"
    info = registry().get(spec.platform)
    if info is None or file_name not in info.files:
        params["sealed_file"] = file_name
    if layout.serve_identity:
        params["identity"] = layout.serve_identity
    if layout.entry_point:
        params["entry_point"] = layout.entry_point
    lines = [f'name: "{spec.name}"', 'backend: "python"', f"max_batch_size: {spec.max_batch_size}",
             f"input [\n{tensors(spec.inputs)}\n]", f"output [\n{tensors(spec.outputs)}\n]",
             'instance_group [ { kind: KIND_CPU count: 1 } ]']  # fmt: skip
    if spec.batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 1000 }")
    lines += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _check(layout: Layout) -> None:
    if not layout.sealed.is_file():
        raise UsageError(f"{layout.sealed} is not a sealed model file")
    if not layout.name or layout.name.startswith(".") or "/" in layout.name or not layout.name.isprintable():
        raise UsageError(f"model name {layout.name!r} must be a plain directory name")
    for value in (layout.name, layout.serve_identity, layout.env_path, layout.entry_point):
        _check_written(value or "", "names, paths and identities")
    identity = layout.serve_identity
    if identity and not identity.startswith(("agent:", "env:")):
        if not os.path.isfile(identity):  # the value itself is never shown: it may be a key
            raise UsageError("--serve-identity: config.pbtxt may name agent:SOCKET, env:VAR or a key file, never "
                             "a key itself (the value given is none of these; it is not repeated here)")  # fmt: skip
        layout.serve_identity = os.path.abspath(identity)  # Triton's working directory is not ours


def _check_written(value: str, what: str) -> None:
    """A value written between quotes into config.pbtxt: one printable line without quotes or backslashes
    (a tensor name holding '" } ] parameters {' would add settings of its own to the config)."""
    if '"' in value or "\\" in value or not value.isprintable():
        raise UsageError(f"{what} written into config.pbtxt must be printable, without '\"' or '\\\\' "
                         f"(one of {len(value)} characters is not)")  # fmt: skip


def lay_out(layout: Layout) -> dict[str, Any]:
    """Lay out ``layout.name`` in the repository; a report of what was written (the ``--json`` document)."""
    _check(layout)
    platform = layout.platform or guess_platform(layout.sealed.parent, layout.sealed.name)
    target = layout.repository / layout.name
    if target.exists():
        raise UsageError(f"{target} exists: pick another --name or remove it")
    spec = ModelSpec(layout.name, target, platform, layout.max_batch_size or 0, layout.inputs, layout.outputs,
                     parameters={"entry_point": layout.entry_point} if layout.entry_point else {})  # fmt: skip
    if layout.entry_point:  # a state dict's module is looked for in the model directory: read it from beside the file
        spec = dataclasses.replace(spec, path=layout.sealed.parent)
    identity = resolve_identity(layout.identity)
    with open_source(layout.sealed, lambda: identity) as source:
        if not source.sealed:
            raise UsageError(f"{layout.sealed} is not sealed: Triton would serve it without modelseal")
        try:
            runtime, spec = build(spec, source, 0, 0 if layout.max_batch_size == 0 else 4)
        except ConfigError as exc:
            raise UsageError(f"{layout.sealed}: {str(exc).partition(': declare')[0]}; declare them with "
                             "--input/--output NAME:DATATYPE:DIMS") from None  # fmt: skip
        runtime.close()
    for t in (*spec.inputs, *spec.outputs):
        _check_written(t.name, "tensor names (from the model)")
        if t.datatype in ("BYTES", "BF16"):
            raise UsageError(f"tensor {t.name!r} is {t.datatype}: inside Triton only numeric tensors are served")
    text = _config_text(spec, layout, layout.sealed.name)
    layout.repository.mkdir(parents=True, exist_ok=True)
    model_py = Path(__file__).with_name("model.py").read_text() if layout.copy_model_py else REFERENCE
    mode = atomicfile.default_mode()
    with atomicfile.directory(target, atomicfile.default_mode(directory=True)) as tmp:
        (tmp / "1").mkdir()
        atomicfile.write_bytes(tmp / "config.pbtxt", text.encode(), mode)
        atomicfile.write_bytes(tmp / "1" / "model.py", model_py.encode(), mode)
        with open(layout.sealed, "rb") as src:
            atomicfile.write_file(tmp / "1" / layout.sealed.name, mode, lambda fd: _copy(src, fd))
    return {
        "model": layout.name, "directory": str(target), "platform": spec.platform,
        "max_batch_size": spec.max_batch_size,
        "inputs": [{"name": t.name, "datatype": t.datatype, "dims": list(t.dims)} for t in spec.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "dims": list(t.dims)} for t in spec.outputs],
        "files": ["config.pbtxt", "1/model.py", f"1/{layout.sealed.name}"],
        "model_py": "copy" if layout.copy_model_py else "reference",
    }  # fmt: skip


def _copy(src: Any, fd: int) -> None:
    with os.fdopen(os.dup(fd), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
