"""A serving runtime added from outside the package, by the public :func:`register` and by a real
``modelseal.runtimes`` entry point (a distribution's metadata on ``sys.path``), serves a sealed model
through the model manager; the registry refuses clashes and leaves out a plug-in that fails to load."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import modelseal
from modelseal.errors import UsageError
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository
from modelseal.serve.runtimes import base

BUILT_IN = ["onnxruntime_onnx", "pytorch_libtorch", "tensorflow_savedmodel", "tvm", "openvino"]

TOY = '''
"""A toy runtime that is no part of modelseal: its model is a JSON file {"scale": k}, and y = k * x."""
import json

from modelseal.crypto.keys import wipe
from modelseal.serve.runtimes.base import RuntimeInfo


class ScaleRuntime:
    device = "cpu"

    def __init__(self, spec, source, threads):
        if source.sealed:
            files = source.files()
            try:
                (data,) = files.values()
                self.scale = json.loads(bytes(data))["scale"]
            finally:
                for buffer in files.values():
                    wipe(buffer)
        else:
            self.scale = json.loads(source.path.read_text())["scale"]

    def check(self, spec):
        pass

    def run(self, inputs, outputs):
        return {"y": inputs["x"] * self.scale}

    def close(self):
        self.scale = 0


RUNTIME = RuntimeInfo("toy_scale", ScaleRuntime, ("model.scale.sealed", "model.scale"), backend="toy")
'''
CONFIG = """name: "toy"
{platform}
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 3 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
"""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next lookup fills a new registry (this test's plug-ins), and the process's comes back after."""
    monkeypatch.setattr(base, "_registry", None)


def toy_module(directory: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (directory / f"{name}.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()


def entry_point(directory: Path, dist: str, line: str) -> None:
    info = directory / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{base.ENTRY_POINT_GROUP}]\n{line}\n")


def serve_toy(tmp_path: Path, host: HpkeIdentity, platform_line: str) -> np.ndarray:
    """A sealed toy model in a repository, loaded by the model manager and asked for y of x = [1, 2, 3]."""
    version = tmp_path / "repo" / "toy" / "1"
    version.mkdir(parents=True)
    (version / "model.scale").write_text('{"scale": 3}')
    modelseal.seal(version / "model.scale", version / "model.scale.sealed", [host.recipient], as_bundle=True)
    (version / "model.scale").unlink()
    (version.parent / "config.pbtxt").write_text(CONFIG.format(platform=platform_line))

    async def scenario() -> np.ndarray:
        manager = ModelManager(Repository(tmp_path / "repo"), host, Metrics())
        await manager.load("toy")
        model = manager.get("toy")
        assert manager.metadata(model)["platform"] == "toy_scale"
        y = (await manager.infer(model, {"x": np.array([1, 2, 3], np.float32)}, []))["y"]
        await manager.close()
        return y

    return asyncio.run(scenario())


def test_a_runtime_registered_by_a_program_serves_a_sealed_model(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    toy_module(tmp_path, "toy_runtime_public", monkeypatch)
    base.register(importlib.import_module("toy_runtime_public").RUNTIME)
    assert serve_toy(tmp_path, host, 'platform: "toy_scale"').tolist() == [3, 6, 9]


def test_a_runtime_from_an_installed_entry_point_serves_a_sealed_model_by_its_backend_name(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    toy_module(tmp_path, "toy_runtime_plugin", monkeypatch)
    entry_point(tmp_path, "toy_runtime_plugin", "toy = toy_runtime_plugin:RUNTIME")
    assert "toy_scale" in base.registry().platforms()  # filled from the entry point, with the built-ins
    assert {"onnxruntime_onnx", "pytorch_libtorch", "tensorflow_savedmodel"} <= set(base.registry().platforms())
    assert serve_toy(tmp_path, host, 'backend: "toy"').tolist() == [3, 6, 9]


def test_a_platform_or_backend_belongs_to_one_runtime(fresh_registry: None) -> None:
    onnx = base.registry().get("onnxruntime_onnx")
    assert onnx is not None
    with pytest.raises(UsageError, match="platform 'onnxruntime_onnx' is already served"):
        base.register(onnx)
    with pytest.raises(UsageError, match="backend 'onnxruntime' already means platform 'onnxruntime_onnx'"):
        base.register(base.RuntimeInfo("other", onnx.runtime, ("model.other",), backend="onnxruntime"))
    with pytest.raises(UsageError, match="registered with a RuntimeInfo, not type"):
        base.register(object)  # type: ignore[arg-type]


def test_a_plugin_that_fails_to_load_is_left_out_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None, caplog: pytest.LogCaptureFixture
) -> None:
    entry_point(tmp_path, "broken_runtime", "broken = no_such_module_here:RUNTIME")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="modelseal.serve"):
        platforms = base.registry().platforms()
    assert platforms == BUILT_IN
    assert (
        "serving runtime broken (no_such_module_here:RUNTIME of broken_runtime) is not used: "
        "ModuleNotFoundError: No module named" in caplog.text
    )


def test_a_config_naming_no_registered_platform_lists_what_is_served(tmp_path: Path, fresh_registry: None) -> None:
    from modelseal.serve.repository import ConfigError, parse_config

    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "config.pbtxt").write_text(CONFIG.format(platform='platform: "toy_scale"'))
    served = f"supported: {', '.join(BUILT_IN)}; backends onnxruntime, pytorch, tensorflow, tvm, openvino"
    with pytest.raises(ConfigError, match=rf"platform toy_scale is not served \({served}\)"):
        parse_config(tmp_path / "toy")


def test_a_platform_two_installed_plugins_claim_is_served_once_and_the_clash_names_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None, caplog: pytest.LogCaptureFixture
) -> None:
    toy_module(tmp_path, "toy_runtime_twice", monkeypatch)
    for dist in ("toy_runtime_a", "toy_runtime_b"):
        (tmp_path / dist).mkdir()
        entry_point(tmp_path / dist, dist, f"{dist.removeprefix('toy_runtime_')} = toy_runtime_twice:RUNTIME")
        monkeypatch.syspath_prepend(str(tmp_path / dist))
    with caplog.at_level(logging.WARNING, logger="modelseal.serve"):
        assert base.registry().platforms().count("toy_scale") == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "toy_runtime_a" in warning and "toy_runtime_b" in warning and "toy_runtime_twice:RUNTIME" in warning


def test_a_plugin_failure_is_logged_in_one_line_with_its_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "toy_runtime_raises.py").write_text('raise RuntimeError("cannot start\\n  detail line two")\n')
    entry_point(tmp_path, "toy_runtime_raises", "raises = toy_runtime_raises:RUNTIME")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_runtime_raises", raising=False)
    with caplog.at_level(logging.WARNING, logger="modelseal.serve"):
        base.registry()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.endswith("is not used: RuntimeError: cannot start") and "\n" not in warning


class SaysItIsEveryName(str):
    """A platform name that equals any other and hashes like onnxruntime_onnx."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return hash("onnxruntime_onnx")


def test_platform_backend_and_file_names_are_plain_strings(fresh_registry: None) -> None:
    """Names are compared as ``str``: a plug-in's own ``__eq__``/``__hash__`` never decides what a name means."""
    onnx = base.registry().get("onnxruntime_onnx")
    assert onnx is not None
    for info in (
        base.RuntimeInfo(SaysItIsEveryName("toy_scale"), onnx.runtime, ("model.scale",)),
        base.RuntimeInfo("toy_scale", onnx.runtime, ("model.scale",), backend=SaysItIsEveryName("toy")),
        base.RuntimeInfo("toy_scale", onnx.runtime, (SaysItIsEveryName("model.scale"),)),
        base.RuntimeInfo("toy_scale", onnx.runtime, "model.scale"),  # type: ignore[arg-type]
    ):
        with pytest.raises(UsageError, match=r"^a serving runtime's platform, backend and file names are str"):
            base.register(info)
    assert base.registry().platforms() == BUILT_IN
    assert base.registry().get("onnxruntime_onnx") is onnx
