"""A model repository in Triton's layout, whose artifacts may be sealed::

    REPO/<model>/config.pbtxt | config.yaml | config.json
    REPO/<model>/<version>/model.onnx.sealed      (ONNX; or model.onnx, or a sealed directory)
    REPO/<model>/<version>/model.pt.sealed        (TorchScript)
    REPO/<model>/<version>/model.safetensors.sealed  (a state dict + the config's entry_point module)
    REPO/<model>/<version>/model.savedmodel.sealed   (TensorFlow SavedModel: a sealed directory or bundle)

The config is read with protobuf's text format against ``protocol/model_config.proto`` (Triton's field
names), so an existing ``config.pbtxt`` works unchanged; YAML and JSON use the same names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import FormatError, UsageError
from modelseal.format.bundle import is_bundle
from modelseal.serve import datatypes
from modelseal.serve.protocol import model_config

log = logging.getLogger("modelseal.serve")
CONFIG_NAMES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
PLATFORMS = {
    "onnxruntime_onnx": ("model.onnx.sealed", "model.onnx"),
    "pytorch_libtorch": ("model.pt.sealed", "model.pt", "model.safetensors.sealed", "model.safetensors"),
    "tensorflow_savedmodel": ("model.savedmodel.sealed", "model.savedmodel"),
}
BACKENDS = {"onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch", "tensorflow": "tensorflow_savedmodel"}


class ConfigError(UsageError):
    """A model's config cannot be used, or disagrees with its model: the message names the model (its
    config path) and what to change. Served as 400 by ``load`` and as the reason in the index."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # protocol name: FP32, INT64...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = variable

    def metadata(self, batching: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": [-1, *self.dims] if batching else list(self.dims),
        }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instances: int = 1
    max_queue_delay_s: float | None = None  # None: no dynamic batching
    preferred_batch_sizes: tuple[int, ...] = ()
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.path.iterdir() if p.is_dir() and p.name.isdigit())

    def artifact(self, version: int) -> Path:
        """The model file of ``version``: the configured file name, else the platform's default names."""
        base = self.path / str(version)
        names = (self.default_model_filename,) if self.default_model_filename else PLATFORMS[self.platform]
        for name in names:
            if (base / name).exists():
                return base / name
        raise ConfigError(f"model {self.name} version {version}: none of {', '.join(names)} in {base}")


def is_sealed(path: Path) -> bool:
    """A sealed bundle or sealed safetensors file, or a sealed directory (its members are bundles)."""
    if path.is_dir():
        return any(is_bundle(p) for p in path.rglob("*") if p.is_file())
    if is_bundle(path):
        return True
    from modelseal.artifacts import open_locked

    try:
        open_locked(path).close()
    except (FormatError, OSError):
        return False
    return True


def parse_config(directory: Path) -> ModelSpec:
    """Read ``directory``'s config (pbtxt, YAML or JSON) into a :class:`ModelSpec`, checking it."""
    from google.protobuf import json_format, text_format

    messages = model_config()
    config = messages.ModelConfig()
    found = [directory / n for n in CONFIG_NAMES if (directory / n).exists()]
    if not found:
        raise ConfigError(f"model {directory.name}: {directory} has no config ({' or '.join(CONFIG_NAMES)})")
    path = found[0]
    try:
        text = path.read_text()
        if path.suffix == ".pbtxt":
            text_format.Parse(text, config, allow_unknown_field=True)
        else:
            data = json.loads(text) if path.suffix == ".json" else _yaml(text, path)
            json_format.ParseDict(data or {}, config, ignore_unknown_fields=True)
    except (text_format.ParseError, json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    name = config.name or directory.name
    if name != directory.name:
        raise ConfigError(f"{path}: name {name!r} differs from the model directory {directory.name!r}")
    platform = config.platform or BACKENDS.get(config.backend, "")
    if platform not in PLATFORMS:
        raise ConfigError(
            f"{path}: platform {config.platform or config.backend or '(none)'} is not served "
            f"(supported: {', '.join(PLATFORMS)}; backends {', '.join(BACKENDS)})"
        )

    def tensors(items: Any, what: str) -> tuple[TensorSpec, ...]:
        specs: list[TensorSpec] = []
        for t in items:
            if not t.name:
                raise ConfigError(f"{path}: an {what} has no name")
            if any(s.name == t.name for s in specs):
                raise ConfigError(f"{path}: {what} {t.name!r} is declared twice")
            try:
                dtype = datatypes.from_config(messages.DataType.Name(t.data_type))
            except (UsageError, ValueError) as exc:
                raise ConfigError(f"{path}: {what} {t.name!r}: {exc}") from None
            dims = tuple(int(d) for d in t.dims)
            if any(d < -1 for d in dims):
                raise ConfigError(f"{path}: {what} {t.name!r} has dims {list(dims)}; each must be -1 or >= 0")
            specs.append(TensorSpec(t.name, dtype, dims))
        if not specs:
            raise ConfigError(f"{path}: no {what}s declared")
        return tuple(specs)

    batching = config.HasField("dynamic_batching")
    delay = config.dynamic_batching.max_queue_delay_microseconds / 1e6 if batching else None
    if batching and config.max_batch_size <= 0:
        raise ConfigError(f"{path}: dynamic_batching needs max_batch_size > 0")
    return ModelSpec(
        name=name,
        path=directory,
        platform=platform,
        max_batch_size=max(0, config.max_batch_size),
        inputs=tensors(config.input, "input"),
        outputs=tensors(config.output, "output"),
        instances=max(1, sum(g.count or 1 for g in config.instance_group) or 1),
        max_queue_delay_s=delay,
        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size),
        default_model_filename=config.default_model_filename or None,
        parameters={k: v.string_value for k, v in config.parameters.items()},
    )


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading YAML configs needs PyYAML (pip install 'modelseal[serve]')") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


class Repository:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"model repository {self.root} is not a directory")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def spec(self, name: str) -> ModelSpec:
        directory = self.root / name
        if not directory.is_dir() or name.startswith(".") or "/" in name:
            raise UsageError(f"model {name!r} is not in the repository {self.root}")
        return parse_config(directory)
