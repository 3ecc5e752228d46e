"""Loading a sealed model into the server, in process: the identity is resolved once per server, each load
opens and parses the artifact once for all its instances, and what we keep of the decrypted weights is
zeroed when the model is unloaded (or right after load, for buffers only the load needs)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.errors import ServeError
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository

from .serving import add_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def double_model() -> bytes:
    """input [batch, 4] FP32 -> output = input + input."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "input"], ["output"])],
        "double",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts identity resolutions, sealed-file opens (mapped for reading), header parses, and every
    ``open()`` of a sealed file (the format layer's magic sniff included), anywhere in the process."""
    import modelseal.format.bundle as bundle
    import modelseal.format.safetensors as safetensors
    import modelseal.load.artifacts as artifacts
    from modelseal.format.envelope import Envelope

    counts: Counter[str] = Counter()

    def counting(key: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(artifacts, "load_identity", counting("resolve", artifacts.load_identity))
    for module in (artifacts, bundle, safetensors):
        monkeypatch.setattr(module, "map_file", counting("open", module.map_file))
    monkeypatch.setattr(Envelope, "parse", classmethod(counting("parse", Envelope.parse.__func__)))  # type: ignore[attr-defined]
    real_open, real_os_open = builtins.open, os.open

    def open_counted(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".sealed"):
            counts["os_open"] += 1
        return real_open(file, *args, **kwargs)

    def os_open_counted(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".sealed"):
            counts["os_open"] += 1
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_counted)
    monkeypatch.setattr(os, "open", os_open_counted)
    return counts


def test_two_instances_open_and_parse_the_sealed_model_once_and_the_identity_resolves_once_per_server(
    tmp_path: Path, host: HpkeIdentity, host_key: Path, counted: Counter[str]
) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "double", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient],
              instances=2)  # fmt: skip

    async def scenario() -> tuple[dict[str, int], np.ndarray]:
        manager = ModelManager(Repository(repo), str(host_key), Metrics())
        await manager.load("double")
        assert len(manager.get("double").runtimes) == 2
        first = dict(counted)
        await manager.load("double")  # a reload opens the file again, and resolves nothing
        assert counted["resolve"] == 1 and counted["open"] == 2 * first["open"]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        y = (await manager.infer(manager.get("double"), {"input": x}, []))["output"]
        await manager.close()
        return first, y

    first, y = asyncio.run(scenario())
    # ac0b701: 6 opens (4 of them magic sniffs), 3 header parses and 4 identity resolutions
    assert first == {"resolve": 1, "open": 1, "parse": 1, "os_open": 1}  # the file is opened by the OS once
    assert np.array_equal(y, 2 * np.arange(8, dtype=np.float32).reshape(2, 4))


def test_decrypted_model_files_are_wiped_once_the_onnx_sessions_exist(
    tmp_path: Path, host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelseal.serve.source import ModelSource

    repo = tmp_path / "repo"
    add_model(repo, "double", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient],
              instances=2)  # fmt: skip
    handed_out: list[bytearray] = []
    real_files = ModelSource.files

    def files(self: ModelSource) -> dict[str, bytearray]:
        found = real_files(self)
        handed_out.extend(found.values())
        return found

    monkeypatch.setattr(ModelSource, "files", files)

    async def scenario() -> None:
        manager = ModelManager(Repository(repo), host, Metrics())
        await manager.load("double")
        await manager.close()

    asyncio.run(scenario())
    assert len(handed_out) == 2 and all(len(b) > 100 for b in handed_out)  # one decrypted graph per instance
    assert all(not any(b) for b in handed_out)


def test_unloading_a_torch_model_zeroes_its_weights(tmp_path: Path, host: HpkeIdentity) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4))), buffer)
    repo = tmp_path / "repo"
    add_model(repo, "linear", "pytorch_libtorch", buffer.getvalue(), (4,), 4, recipients=[host.recipient])

    async def scenario() -> list[Any]:
        manager = ModelManager(Repository(repo), host, Metrics())
        await manager.load("linear")
        runtime = manager.get("linear").runtimes[0]
        weights = [*runtime.module.parameters()]  # type: ignore[attr-defined]
        assert all(bool(w.abs().sum() > 0) for w in weights)
        await manager.unload("linear", "test")
        return weights

    weights = asyncio.run(scenario())
    assert weights and all(bool((w == 0).all()) for w in weights)


def test_a_sealed_directory_with_external_weights_is_served_from_memory(tmp_path: Path, host: HpkeIdentity) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from .serving import CONFIG

    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])], "matmul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    plain = tmp_path / "plain"
    plain.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), plain / "model.onnx",
                    save_as_external_data=True, location="weights.bin", size_threshold=0)  # fmt: skip
    repo = tmp_path / "repo"
    (repo / "mm" / "1").mkdir(parents=True)
    modelseal.seal(plain, repo / "mm" / "1" / "model.onnx.sealed", [host.recipient])
    (repo / "mm" / "config.pbtxt").write_text(CONFIG.format(name="mm", platform="onnxruntime_onnx", max_batch=2,
                                                            dims=4, classes=4, instances=1, batching=""))  # fmt: skip

    async def scenario() -> np.ndarray:
        manager = ModelManager(Repository(repo), host, Metrics())
        await manager.load("mm")
        x = np.ones((1, 4), np.float32)
        y = (await manager.infer(manager.get("mm"), {"input": x}, []))["output"]
        await manager.close()
        return y

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((1, 4), np.float32) @ weight)


def test_an_identity_that_cannot_be_resolved_is_the_reason_sealed_models_do_not_load(
    tmp_path: Path, host: HpkeIdentity
) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "sealed", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient])
    add_model(repo, "plain", "onnxruntime_onnx", double_model(), (4,), 4, recipients=None)

    async def scenario() -> list[dict[str, str]]:
        manager = ModelManager(Repository(repo), str(tmp_path / "missing.key"), Metrics())
        for name in ("sealed", "plain"):
            with contextlib.suppress(ServeError):
                await manager.load(name)
        index = manager.index()
        await manager.close()
        return index

    plain, sealed = asyncio.run(scenario())
    assert plain == {"name": "plain", "version": "1", "state": "READY"}
    assert sealed["state"] == "UNAVAILABLE"
    assert sealed["reason"] == f"cannot read identity file '{tmp_path / 'missing.key'}': No such file or directory"


def test_a_sealed_state_dict_becomes_the_module_and_is_zeroed_on_unload(tmp_path: Path, host: HpkeIdentity) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from .serving import CONFIG

    model_dir = tmp_path / "repo" / "lin"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "linarch_loading.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 4)\n")
    torch.manual_seed(1)
    reference = torch.nn.Linear(4, 4)
    save_file(reference.state_dict(), str(tmp_path / "state.safetensors"))
    modelseal.seal(tmp_path / "state.safetensors", model_dir / "1" / "model.safetensors.sealed", [host.recipient])
    config = CONFIG.format(name="lin", platform="pytorch_libtorch", max_batch=2, dims=4, classes=4, instances=1,
                           batching="")  # fmt: skip
    (model_dir / "config.pbtxt").write_text(config + 'parameters { key: "entry_point" value: '
                                            '{ string_value: "linarch_loading:build" } }\n')  # fmt: skip

    async def scenario() -> tuple[np.ndarray, list[Any]]:
        manager = ModelManager(Repository(tmp_path / "repo"), host, Metrics())
        await manager.load("lin")
        weights = [*manager.get("lin").runtimes[0].module.parameters()]  # type: ignore[attr-defined]
        x = np.ones((1, 4), np.float32)
        y = (await manager.infer(manager.get("lin"), {"input": x}, []))["output"]
        await manager.close()
        return y, weights

    y, weights = asyncio.run(scenario())
    with torch.no_grad():
        np.testing.assert_allclose(y, reference(torch.ones(1, 4)).numpy(), rtol=1e-6)
    assert len(weights) == 2 and all(bool((w == 0).all()) for w in weights)
