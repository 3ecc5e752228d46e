"""serve resolves its identity once, but a spec that failed (a key file not there yet) is tried again at the
next load instead of failing every later load of the server's life."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.errors import ServeError
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository

from .serving import add_model
from .test_serve_loading import double_model

pytest.importorskip("onnxruntime")


def test_a_key_file_that_appears_after_start_up_is_used_by_the_next_load(tmp_path: Path, host: HpkeIdentity) -> None:
    repo, key = tmp_path / "repo", tmp_path / "host.key"
    add_model(repo, "sealed", "onnxruntime_onnx", double_model(), (4,), 4, recipients=[host.recipient])

    async def scenario() -> tuple[str, str, np.ndarray]:
        manager = ModelManager(Repository(repo), str(key), Metrics())
        with pytest.raises(ServeError):
            await manager.load("sealed")
        before = manager.index()[0]["reason"]
        host.save(key)  # the operator installs the key file; no restart
        await manager.load("sealed")
        after = manager.index()[0]["state"]
        y = (await manager.infer(manager.get("sealed"), {"input": np.ones((1, 4), np.float32)}, []))["output"]
        await manager.close()
        return before, after, y

    before, after, y = asyncio.run(scenario())
    assert "cannot read identity file" in before and str(key) in before
    assert after == "READY" and np.array_equal(y, np.full((1, 4), 2, np.float32))
