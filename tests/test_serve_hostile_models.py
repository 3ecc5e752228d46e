"""Hostile files in a model repository: each is that model's one-line load-failure reason, never a hang of
the server (a load blocked on a FIFO held the model's lock, every later model and the shutdown wait)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from modelseal.format.bundle import is_bundle
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.errors import ServeError
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository

from .serving import add_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def double_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "input"], ["output"])], "double",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


def load_all(repo: Path, identity: Any, fifos: list[Path], timeout_s: float = 20) -> dict[str, dict[str, str]]:
    """Every model of ``repo`` loaded in order, as serve's start-up does, in a thread that must finish within
    ``timeout_s``; a reader still blocked on one of ``fifos`` is released afterwards (a writer opens it)."""

    async def scenario() -> dict[str, dict[str, str]]:
        manager = ModelManager(Repository(repo), identity, Metrics())
        for name in manager.repository.names():
            with contextlib.suppress(ServeError):
                await manager.load(name)
        index = {m["name"]: m for m in manager.index()}
        await manager.close()
        return index

    result: list[dict[str, dict[str, str]]] = []
    worker = threading.Thread(target=lambda: result.append(asyncio.run(scenario())), daemon=True)
    worker.start()
    worker.join(timeout_s)
    hung = worker.is_alive()
    for fifo in fifos:  # unblock a reader stuck in open(), so the test process can exit
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not hung, f"loading the repository hung for {timeout_s} s on a FIFO"
    return result[0]


def test_a_fifo_as_a_model_file_is_that_models_reason_and_other_models_load(tmp_path: Path, host: HpkeIdentity) -> None:
    repo = tmp_path / "repo"
    fifos = []
    for name, sealed in (("a_plain_fifo", False), ("b_sealed_fifo", True)):
        directory = add_model(repo, name, "onnxruntime_onnx", double_model(), (4,), 4,
                              recipients=[host.recipient] if sealed else None)  # fmt: skip
        model = directory / ("model.onnx.sealed" if sealed else "model.onnx")
        model.unlink()
        os.mkfifo(model)
        fifos.append(model)
    member = add_model(repo, "c_fifo_in_a_directory", "onnxruntime_onnx", double_model(), (4,), 4,
                       recipients=None) / "model.onnx"  # fmt: skip
    member.unlink()
    member.mkdir()
    (member / "model.onnx").write_bytes(double_model())
    os.mkfifo(member / "weights.bin")
    fifos.append(member / "weights.bin")
    add_model(repo, "d_good", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient])

    index = load_all(repo, host, fifos, timeout_s=10)
    assert index["d_good"]["state"] == "READY"
    for name, fifo in zip(("a_plain_fifo", "b_sealed_fifo", "c_fifo_in_a_directory"), fifos, strict=True):
        assert index[name]["state"] == "UNAVAILABLE"
        assert index[name]["reason"] == f"{fifo} is not a regular file (a FIFO or device cannot be a model file)"
    assert not is_bundle(fifos[0]) and not is_bundle("/dev/null") and not is_bundle(tmp_path)


def test_an_onnx_model_reading_a_descriptor_of_the_server_is_that_models_reason(
    tmp_path: Path, host: HpkeIdentity
) -> None:
    """A Constant whose external data is 'N' would read the server's descriptor N (/proc/self/fd/N)."""
    from .test_onnx import hostile_model

    repo = tmp_path / "repo"
    add_model(repo, "fd", "onnxruntime_onnx", hostile_model("constant", "3").SerializeToString(), (4,), 4,
              recipients=[host.recipient])  # fmt: skip
    add_model(repo, "good", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient])
    index = load_all(repo, host, [], timeout_s=10)
    assert index["good"]["state"] == "READY" and index["fd"]["state"] == "UNAVAILABLE"
    assert "tensor 'c' (graph.node[0].attribute[0].t) keeps its data outside the model ('3')" in index["fd"]["reason"]
