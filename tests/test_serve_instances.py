"""A model instance is never handed to a second request while a first one still runs on it, even when the
first caller gives up (client gone, batch abandoned): runtimes are not thread-safe."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from modelseal.serve.models import LoadedModel
from modelseal.serve.repository import ModelSpec


class SlowRuntime:
    """Records overlapping calls: two threads inside ``run`` at once is the bug."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False
        self.overlaps = 0

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        with self.lock:
            self.overlaps += self.busy
            self.busy = True
        time.sleep(0.3)
        with self.lock:
            self.busy = False
        return {"y": inputs["x"]}

    def close(self) -> None:
        pass


def one_instance(threads: int) -> tuple[SlowRuntime, LoadedModel]:
    """A loaded model of one slow instance (inside a running event loop), its pool of ``threads``."""
    runtime = SlowRuntime()
    spec = ModelSpec("slow", Path("."), "onnxruntime_onnx", 0, (), ())
    model = LoadedModel(spec=spec, version=1, runtimes=[runtime], keys=set(),  # type: ignore[list-item]
                        pool=ThreadPoolExecutor(max_workers=threads))  # fmt: skip
    model.idle.put_nowait(runtime)  # type: ignore[arg-type]
    return runtime, model


def test_a_cancelled_request_keeps_its_instance_until_the_run_ends() -> None:
    async def scenario() -> int:
        runtime, model = one_instance(2)
        x = {"x": np.zeros(1, np.float32)}
        first = asyncio.ensure_future(model.execute(x, ["y"]))
        await asyncio.sleep(0.05)
        first.cancel()  # the caller leaves while the instance is still running its request
        second = await model.execute(x, ["y"])
        assert np.array_equal(second["y"], x["x"])
        model.pool.shutdown(wait=True)
        return runtime.overlaps

    assert asyncio.run(scenario()) == 0  # ac0b701 ran the second request on the busy instance


def test_every_request_waiting_for_an_instance_is_answered_when_the_model_closes() -> None:
    """The review left 12 of 40 trials with requests waiting forever: the closed sentinel woke one waiter,
    which did not pass it on."""

    async def scenario() -> list[str]:
        _, model = one_instance(1)
        x = {"x": np.zeros(1, np.float32)}
        waiting = [asyncio.ensure_future(model.execute(x, ["y"])) for _ in range(8)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(model.close(), 10)
        done = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
        return ["ok" if isinstance(r, dict) else type(r).__name__ for r in done]

    answers = asyncio.run(scenario())
    assert answers[0] == "ok" and set(answers[1:]) == {"ServeError"}, answers
