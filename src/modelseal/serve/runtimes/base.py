"""The :class:`Runtime` interface and the one registry of served platforms.

A platform (config.pbtxt's ``platform``, Triton's names) maps to one :class:`RuntimeInfo`: the runtime
class, the default model file names looked for in a version directory, and the ``backend`` alias a
config may name instead. The registry is filled once, on first use: the built-in modules listed in
:data:`BUILTIN` (one line each), then every ``modelseal.runtimes`` entry point of an installed package,
each of which names a :class:`RuntimeInfo`. :func:`register` adds one from a program. The repository (which
platforms and files exist) and the model manager (which class builds an instance) only ask the registry.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import numpy as np

from modelseal.errors import UsageError, one_line

if TYPE_CHECKING:
    from modelseal.serve.repository import ModelSpec
    from modelseal.serve.source import ModelSource

log = logging.getLogger("modelseal.serve")
ENTRY_POINT_GROUP = "modelseal.runtimes"
BUILTIN = (  # each defines RUNTIME, a RuntimeInfo; importing one imports no framework
    "modelseal.serve.runtimes.onnxruntime",
    "modelseal.serve.runtimes.pytorch",
    "modelseal.serve.runtimes.tensorflow",
    "modelseal.serve.runtimes.tvm",
    "modelseal.serve.runtimes.openvino",
)


class Runtime(Protocol):
    """One instance of a model in memory. Built by ``RuntimeInfo.runtime(spec, source, threads)`` from
    the version's :class:`~modelseal.serve.source.ModelSource` (sealed: unlocked, to decrypt from; plain:
    a path), it may use the source only while it is being built. ``run`` is called from one thread at a
    time per instance; ``close`` frees the model and wipes every buffer of decrypted data it kept."""

    device: str

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...

    def declared(self) -> Signature:
        """What the model itself says of its inputs and outputs, in the model's own order: for each
        tensor its V2 datatype and full shape (batch dimension included; None for a variable dim), either
        None where the framework cannot tell, and (None, None) for a framework that knows nothing. The
        names are those :meth:`run` takes and returns. A config left without inputs or outputs is
        completed from this (:mod:`modelseal.serve.autocomplete`), before :meth:`check`."""

    def check(self, spec: ModelSpec) -> None:
        """Raise :class:`~modelseal.serve.repository.ConfigError` naming how the config disagrees with
        the model (see :mod:`.declared`); called once per instance, right after it is built."""

    def close(self) -> None: ...


# what a model itself says about one tensor: (V2 datatype, or the framework's own name for a type the
# protocol lacks, or None when unknown; the full shape with None for a variable dim, or None when unknown)
Declared = tuple[str | None, tuple[int | None, ...] | None]
# (inputs, outputs) by name, in the model's order; None: the framework cannot tell
Signature = tuple[dict[str, Declared] | None, dict[str, Declared] | None]
RuntimeFactory = Callable[["ModelSpec", "ModelSource", int], Runtime]


@dataclass(frozen=True)
class RuntimeInfo:
    """What serving one platform takes."""

    platform: str  # config.pbtxt's ``platform``: onnxruntime_onnx, pytorch_libtorch...
    runtime: RuntimeFactory  # (spec, source, intra-op threads or 0) -> a Runtime; usually the class
    files: tuple[str, ...]  # default model file names in a version directory, in the order looked for
    backend: str = ""  # config.pbtxt's ``backend`` name meaning this platform ("": none)


class RuntimeRegistry:
    """Platforms by name, and backend aliases. Use :func:`registry` for the process's one registry."""

    def __init__(self) -> None:
        self._platforms: dict[str, RuntimeInfo] = {}
        self._backends: dict[str, str] = {}
        self._sources: dict[str, str] = {}  # platform -> who registered it, named when another claims it

    def register(self, info: RuntimeInfo, source: str = "") -> None:
        """Add ``info`` (``source``: who registers it, named in a later clash; by default the runtime
        itself); a platform or backend name already taken is refused, naming its holder."""
        if not isinstance(info, RuntimeInfo):
            raise UsageError(f"a serving runtime is registered with a RuntimeInfo, not {type(info).__name__}")
        names = (info.platform, info.backend, *info.files) if type(info.files) is tuple else (None,)
        if any(type(name) is not str for name in names):  # compared and hashed as str, never by a plug-in's __eq__
            raise UsageError("a serving runtime's platform, backend and file names are str (files: a tuple of str)")
        if not info.platform or not info.files:
            raise UsageError("a serving runtime needs a platform name and at least one model file name")
        if info.platform in self._platforms:
            raise UsageError(f"platform {info.platform!r} is already served by {self._sources[info.platform]}")
        if info.backend and info.backend in self._backends:
            held = self._backends[info.backend]
            raise UsageError(f"backend {info.backend!r} already means platform {held!r} ({self._sources[held]})")
        self._platforms[info.platform] = info
        self._sources[info.platform] = source or str(info.runtime)
        if info.backend:
            self._backends[info.backend] = info.platform

    def fill(self) -> RuntimeRegistry:
        """Register the built-in runtimes, then the installed ``modelseal.runtimes`` entry points. A plug-in
        that fails to load or clashes with a name already taken is logged and left out: it must not stop
        the server from serving everything else."""
        for module in BUILTIN:
            self.register(importlib.import_module(module).RUNTIME, module)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            source = f"serving runtime {point.name} ({point.value} of {point.dist.name if point.dist else '?'})"
            try:
                self.register(point.load(), source)
            except Exception as exc:  # a third party's import error, wrong type or clash: one line, with its type
                log.warning("%s is not used: %s", source, one_line(exc))
        return self

    def get(self, platform: str) -> RuntimeInfo | None:
        return self._platforms.get(platform)

    def platform_of(self, platform: str, backend: str) -> str | None:
        """The platform a config names: ``platform``, else what its ``backend`` means; None when neither
        is served."""
        name = platform or self._backends.get(backend, "")
        return name if name in self._platforms else None

    def platforms(self) -> list[str]:
        return list(self._platforms)

    def backends(self) -> list[str]:
        return list(self._backends)


_registry: RuntimeRegistry | None = None
_filling = threading.RLock()


def registry() -> RuntimeRegistry:
    """The process's registry, filled on first use (configs are read on threads: filled once under a lock).
    A plug-in that asks for the registry while it is being loaded gets it as filled so far."""
    global _registry
    with _filling:
        if _registry is None:
            _registry = RuntimeRegistry()
            try:
                _registry.fill()
            except BaseException:  # a built-in failed: the next call tries again, not with half a registry
                _registry = None
                raise
        return _registry


def register(info: RuntimeInfo) -> None:
    """Serve ``info.platform`` with ``info.runtime`` in this process (a program embedding the server, or
    a test); an installed package declares an entry point in the ``modelseal.runtimes`` group instead."""
    registry().register(info)


def build(
    spec: ModelSpec, source: ModelSource, threads: int = 0, default_max_batch_size: int = 4
) -> tuple[Runtime, ModelSpec]:
    """One instance of ``spec``'s model from ``source``, and ``spec`` completed from the model where the
    config leaves inputs or outputs out (:mod:`modelseal.serve.autocomplete`), checked to agree."""
    from modelseal.serve.autocomplete import complete

    info = registry().get(spec.platform)
    if info is None:  # a config is checked against the registry when it is read: only a registry changed since
        raise UsageError(f"model {spec.name}: platform {spec.platform} is not served")
    runtime = info.runtime(spec, source, threads)
    try:
        if not spec.complete:  # a complete config is only checked (a PyTorch model is not run to learn it)
            spec = complete(spec, runtime.declared(), default_max_batch_size)
        runtime.check(spec)
    except BaseException:
        runtime.close()
        raise
    return runtime, spec
