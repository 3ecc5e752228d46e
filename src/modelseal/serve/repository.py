"""A model repository in Triton's layout, whose artifacts may be sealed::

    REPO/<model>/config.pbtxt | config.yaml | config.json
    REPO/<model>/<version>/model.onnx.sealed      (ONNX; or model.onnx, or a sealed directory)
    REPO/<model>/<version>/model.pt.sealed        (TorchScript)
    REPO/<model>/<version>/model.safetensors.sealed  (a state dict + the config's entry_point module)
    REPO/<model>/<version>/model.savedmodel.sealed   (TensorFlow SavedModel: a sealed directory or bundle)

Which platforms exist, and the model file names each looks for, come from the runtime registry
(:mod:`modelseal.serve.runtimes.base`). The config is read with protobuf's text format against
``protocol/model_config.proto`` (Triton's field names), so an existing ``config.pbtxt`` works unchanged;
YAML and JSON use the same names.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import UsageError
from modelseal.jsonlimits import JSONLimitError, loads_bounded
from modelseal.serve import datatypes
from modelseal.serve.protocol import model_config
from modelseal.serve.runtimes.base import registry

log = logging.getLogger("modelseal.serve")
CONFIG_NAMES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
# Limits on what a config may ask for: a config is operator input, but a typo (or a hostile repository)
# must be a clear refusal, not a server that forks 100,000 runtimes or holds requests for 584,000 years.
MAX_CONFIG_BYTES = 1 << 20
MAX_INSTANCES = 64  # instances of one model, all its versions together
MAX_BATCH_SIZE = 1 << 16
MAX_QUEUE_DELAY_US = 10_000_000
MAX_VERSIONS = 16  # versions of one model served at once (each holds its weights in memory)
MAX_REASON_CHARS = 1000  # a load failure's reason in the index and the log (a parser may quote its input)


def capped(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class ConfigError(UsageError):
    """A model's config cannot be used, or disagrees with its model: the message names the model (its
    config path) and what to change. Served as 400 by ``load`` and as the reason in the index."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # protocol name: FP32, INT64...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = variable
    label_filename: str = ""  # outputs: one class label per line (the classification extension)

    def metadata(self, batching: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": [-1, *self.dims] if batching else list(self.dims),
        }


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directories are served (Triton's ``version_policy``): the newest ``latest`` ones
    (default 1), ``all``, or a ``specific`` list."""

    kind: str = "latest"  # latest | all | specific
    latest: int = 1
    specific: tuple[int, ...] = ()

    def choose(self, versions: list[int]) -> list[int]:
        """The versions served, oldest first, out of the version directories found (sorted)."""
        if self.kind == "all":
            return list(versions)
        if self.kind == "specific":
            return [v for v in versions if v in self.specific]
        return versions[-self.latest :]

    def config(self) -> dict[str, Any]:
        if self.kind == "specific":
            return {"specific": {"versions": list(self.specific)}}
        return {"all": {}} if self.kind == "all" else {"latest": {"num_versions": self.latest}}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]  # empty: completed from the model at load (modelseal.serve.autocomplete)
    outputs: tuple[TensorSpec, ...]
    instances: int = 1
    max_queue_delay_s: float | None = None  # None: no dynamic batching
    preferred_batch_sizes: tuple[int, ...] = ()
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    version_policy: VersionPolicy = VersionPolicy()
    backend: str = ""

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    @property
    def complete(self) -> bool:
        """Whether the config declares inputs and outputs (else the model fills them in at load)."""
        return bool(self.inputs) and bool(self.outputs)

    def versions(self) -> list[int]:
        """The version directories served under the version policy, oldest first."""
        return self.version_policy.choose(version_dirs(self.path))

    def artifact(self, version: int) -> Path:
        """The model file of ``version``: the configured file name, else the platform's default names."""
        base = self.path / str(version)
        info = registry().get(self.platform)
        names = info.files if info is not None else ()
        if self.default_model_filename:
            names = (self.default_model_filename,)
        for name in names:
            if _plain_name(name) and (base / name).exists():
                return base / name
        raise ConfigError(f"model {self.name} version {version}: none of {', '.join(names)} in {base}")


def version_number(text: str) -> int | None:
    """``text`` as a version number: ASCII digits only (``int`` takes "²" and "١" too), at most 18."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def version_dirs(path: Path) -> list[int]:
    found = (version_number(p.name) for p in path.iterdir() if p.is_dir())
    return sorted(v for v in found if v is not None)


def _platform_from_files(directory: Path) -> str | None:
    """With no platform in the config (or no config), the platform whose model file the newest version
    directory holds, as Triton guesses from ``model.onnx``, ``model.pt``..."""
    runtimes = registry()
    for version in reversed(version_dirs(directory)):
        for platform in runtimes.platforms():
            info = runtimes.get(platform)
            if info is not None and any((directory / str(version) / n).exists() for n in info.files):
                return platform
    return None


def parse_config(directory: Path, override: str | None = None, strict: bool = False) -> ModelSpec:
    """Read ``directory``'s config (pbtxt, YAML or JSON; ``override``: a JSON config given with a load
    request instead) into a :class:`ModelSpec`, checking it. A model without a config, or whose config
    leaves out the platform, inputs or outputs, is completed from its model files and, at load, from the
    model itself, as Triton does; ``strict`` (``--strict-config``) requires a config naming all three."""
    from google.protobuf import json_format, text_format

    messages = model_config()
    config = messages.ModelConfig()
    found = [directory / n for n in CONFIG_NAMES if (directory / n).exists()]
    path = found[0] if found else directory / CONFIG_NAMES[0]
    where = f"model {directory.name}'s load request config" if override is not None else str(path)
    if override is None and not found and strict:
        raise ConfigError(f"model {directory.name}: {directory} has no config ({' or '.join(CONFIG_NAMES)}) "
                          "and --strict-config requires one")  # fmt: skip
    try:
        if found:
            text = _read_config(path)
            if path.suffix == ".pbtxt":
                text_format.Parse(text, config, allow_unknown_field=True)
            else:
                data = json.loads(text) if path.suffix == ".json" else _yaml(text, path)
                json_format.ParseDict(data or {}, config, ignore_unknown_fields=True)
        if override is not None:
            patch = messages.ModelConfig()
            data = loads_bounded(override.encode(), max_bytes=MAX_CONFIG_BYTES, max_depth=32, what=where)
            json_format.ParseDict(data or {}, patch, ignore_unknown_fields=True)
            _apply_override(config, patch, where)
    except JSONLimitError as exc:
        raise ConfigError(capped(str(exc))) from None
    except (text_format.ParseError, json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(capped(f"{where}: {exc}")) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if config.default_model_filename and not _plain_name(config.default_model_filename):
        raise ConfigError(f"{where}: default_model_filename must name a file in the version directory")
    name = config.name or directory.name
    if name != directory.name:
        raise ConfigError(f"{where}: name {name!r} differs from the model directory {directory.name!r}")
    runtimes = registry()
    platform = runtimes.platform_of(config.platform, config.backend)
    if platform is None and not (config.platform or config.backend) and not strict:
        platform = _platform_from_files(directory)
    if platform is None:
        named = config.platform or config.backend
        served = f"supported: {', '.join(runtimes.platforms())}; backends {', '.join(runtimes.backends())}"
        if named:
            raise ConfigError(f"{where}: platform {named} is not served ({served})")
        raise ConfigError(f"{where}: no platform given, and no version directory holds a model file that tells "
                          f"it ({served})")  # fmt: skip

    def tensors(items: Any, what: str) -> tuple[TensorSpec, ...]:
        specs: list[TensorSpec] = []
        for t in items:
            if not t.name:
                raise ConfigError(f"{where}: an {what} has no name")
            if any(s.name == t.name for s in specs):
                raise ConfigError(f"{where}: {what} {t.name!r} is declared twice")
            try:
                dtype = datatypes.from_config(messages.DataType.Name(t.data_type))
            except (UsageError, ValueError) as exc:
                raise ConfigError(f"{where}: {what} {t.name!r}: {exc}") from None
            dims = tuple(int(d) for d in t.dims)
            if any(d < -1 for d in dims):
                raise ConfigError(f"{where}: {what} {t.name!r} has dims {list(dims)}; each must be -1 or >= 0")
            labels = getattr(t, "label_filename", "")
            if labels and not _plain_name(labels):
                raise ConfigError(f"{where}: {what} {t.name!r}: label_filename must name a file in {directory}")
            specs.append(TensorSpec(t.name, dtype, dims, labels))
        if not specs and strict:
            raise ConfigError(f"{where}: no {what}s declared (--strict-config requires them)")
        return tuple(specs)

    batching = config.HasField("dynamic_batching")
    delay = config.dynamic_batching.max_queue_delay_microseconds / 1e6 if batching else None
    if batching and config.max_batch_size <= 0:
        raise ConfigError(f"{where}: dynamic_batching needs max_batch_size > 0")
    if batching and config.dynamic_batching.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
        raise ConfigError(f"{where}: max_queue_delay_microseconds is at most {MAX_QUEUE_DELAY_US} (10 s)")
    preferred = tuple(config.dynamic_batching.preferred_batch_size)
    if any(not 0 < size <= config.max_batch_size for size in preferred):
        raise ConfigError(f"{where}: each preferred_batch_size must be between 1 and max_batch_size "
                          f"({config.max_batch_size}); got {list(preferred)}")  # fmt: skip
    instances = _instances(config)
    if config.max_batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"{where}: max_batch_size is at most {MAX_BATCH_SIZE}, got {config.max_batch_size}")
    if not 0 < instances <= MAX_INSTANCES:
        raise ConfigError(f"{where}: instance_group counts add up to {instances}; at most {MAX_INSTANCES}")
    return ModelSpec(
        name=name,
        path=directory,
        platform=platform,
        max_batch_size=max(0, config.max_batch_size),
        inputs=tensors(config.input, "input"),
        outputs=tensors(config.output, "output"),
        instances=instances,
        max_queue_delay_s=delay,
        preferred_batch_sizes=preferred,
        default_model_filename=config.default_model_filename or None,
        parameters={k: v.string_value for k, v in config.parameters.items()},
        version_policy=_version_policy(config, where),
        backend=config.backend,
    )


OVERRIDABLE = ("name", "version_policy", "max_batch_size", "input", "output", "instance_group", "dynamic_batching")


def _apply_override(config: Any, patch: Any, where: str) -> None:
    """A load request's config over the repository's: it may change how the model is served (versions,
    batching, instances, tensors), never what is loaded or run -- the platform, the model file, the
    parameters (a state dict's entry point is code), label files -- which stay the operator's."""
    refused = [described.name for described, _ in patch.ListFields() if described.name not in OVERRIDABLE]
    refused += ["label_filename"] if any(t.label_filename for t in patch.output) else []
    if refused:
        raise ConfigError(f"{where}: a load request may not set {', '.join(refused)} (they come from the "
                          f"repository's own config; it may set {', '.join(OVERRIDABLE[1:])})")  # fmt: skip
    if config.max_batch_size and patch.max_batch_size > config.max_batch_size:
        raise ConfigError(f"{where}: a load request may lower max_batch_size, not raise it above the "
                          f"repository's {config.max_batch_size}")  # fmt: skip
    if patch.instance_group and _instances(patch) > _instances(config):
        raise ConfigError(f"{where}: a load request may not ask for more instances ({_instances(patch)}) than "
                          f"the repository's config ({_instances(config)})")  # fmt: skip
    for described, value in patch.ListFields():
        config.ClearField(described.name)
        if described.is_repeated:
            getattr(config, described.name).extend(value)
        elif described.message_type is not None:
            getattr(config, described.name).CopyFrom(value)
        else:
            setattr(config, described.name, value)


def _instances(config: Any) -> int:
    return sum(g.count or 1 for g in config.instance_group) or 1


def _plain_name(name: str) -> bool:
    """A file name in one directory: no path separator, no leading dot (``..``, hidden files), not empty."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name


def _version_policy(config: Any, where: str) -> VersionPolicy:
    choice = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        versions = tuple(int(v) for v in config.version_policy.specific.versions)
        if not versions or any(v < 1 for v in versions):
            raise ConfigError(f"{where}: version_policy specific needs version numbers >= 1, got {list(versions)}")
        return VersionPolicy("specific", specific=versions)
    if choice == "latest":
        n = config.version_policy.latest.num_versions
        if not 0 < n <= MAX_VERSIONS:
            raise ConfigError(f"{where}: version_policy latest num_versions must be 1..{MAX_VERSIONS}, got {n}")
        return VersionPolicy("latest", latest=n)
    return VersionPolicy()


def read_labels(spec: ModelSpec) -> dict[str, list[str]]:
    """The class labels of each output that names a ``label_filename`` (one per line, in the model's
    directory, read like a config: a regular file of at most 1 MiB)."""
    labels = {}
    for t in spec.outputs:
        if t.label_filename:
            path = spec.path / t.label_filename
            try:
                labels[t.name] = _read_config(path).splitlines()
            except OSError as exc:
                raise ConfigError(f"model {spec.name}: label file {path} cannot be read ({exc.strerror})") from None
            except UnicodeDecodeError:
                raise ConfigError(f"model {spec.name}: label file {path} is not UTF-8 text") from None
    return labels


def _read_config(path: Path) -> str:
    """The config's text, read only from a regular file of at most 1 MiB: a FIFO named config.pbtxt
    would block the reader forever, and /dev/zero behind a symlink would fill memory."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: is {info.st_size} bytes; a config may be at most {MAX_CONFIG_BYTES}")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: is larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode()


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading YAML configs needs PyYAML (pip install 'modelseal[serve]')") from None

    class NoAliases(yaml.SafeLoader):
        """YAML without anchors/aliases: 600 bytes of nested aliases expand to 64 MB (a billion laughs),
        and a model config has no use for them."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ConfigError(f"{path}: YAML aliases (*name) are not accepted in a model config")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


class Repository:
    """``strict``: every model needs a full config (``--strict-config``); ``default_max_batch_size``: what
    a completed config's max_batch_size becomes when the model has a variable first dimension on every
    input and output (Triton's ``default-max-batch-size``; 0: never batch a completed model)."""

    def __init__(self, root: str | Path, strict: bool = False, default_max_batch_size: int = 4) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"model repository {self.root} is not a directory")
        self.strict, self.default_max_batch_size = strict, default_max_batch_size

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def spec(self, name: str, override: str | None = None) -> ModelSpec:
        """``name``'s config (``override``: the JSON config of a load request, used instead of the file)."""
        directory = self.root / name
        if not directory.is_dir() or name.startswith(".") or "/" in name:
            raise UsageError(f"model {name!r} is not in the repository {self.root}")
        return parse_config(directory, override, self.strict)
