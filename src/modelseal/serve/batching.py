"""Dynamic batching: requests that arrive within ``max_queue_delay`` are run as one batch (up to
``max_batch_size`` rows, executed at once when a preferred size is reached), then split back.

Requests are concatenated along the batch dimension only when their other dimensions and dtypes agree;
a request that does not fit the batch being formed waits for the next one, in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]
RunBatch = Callable[[Tensors, list[str]], Awaitable[Tensors]]


@dataclass
class Pending:
    inputs: Tensors
    outputs: list[str]
    rows: int
    future: asyncio.Future[Tensors] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def signature(self) -> tuple[object, ...]:
        return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.inputs.items())), tuple(self.outputs)


class DynamicBatcher:
    def __init__(
        self,
        run: RunBatch,
        max_batch_size: int,
        max_delay_s: float,
        preferred: tuple[int, ...] = (),
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.preferred = set(preferred)
        self.on_batch = on_batch
        self.queue: collections.deque[Pending] = collections.deque()
        self.arrived = asyncio.Event()
        self.tasks = [asyncio.get_running_loop().create_task(self._worker()) for _ in range(max(1, workers))]

    async def submit(self, inputs: Tensors, outputs: list[str]) -> Tensors:
        rows = next(iter(inputs.values())).shape[0]
        item = Pending(inputs, outputs, rows)
        self.queue.append(item)
        self.arrived.set()
        return await item.future

    def _take(self) -> list[Pending]:
        """The batch to run now: the oldest request and every later compatible one that fits."""
        first = self.queue.popleft()
        batch, rows, key = [first], first.rows, first.signature()
        for item in list(self.queue):
            if rows >= self.max_batch_size:
                break
            if item.signature() == key and rows + item.rows <= self.max_batch_size:
                self.queue.remove(item)
                batch.append(item)
                rows += item.rows
        return batch

    def _ready(self, started: float) -> bool:
        rows = sum(p.rows for p in self.queue)
        return rows >= self.max_batch_size or rows in self.preferred or time.monotonic() - started >= self.max_delay_s

    async def _worker(self) -> None:
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            started = time.monotonic()
            while not self._ready(started):  # give later requests until the delay expires to join
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), self.max_delay_s - (time.monotonic() - started))
                except TimeoutError:
                    break
            if not self.queue:
                continue  # another worker took them
            batch = self._take()
            await self._execute(batch)

    async def _execute(self, batch: list[Pending]) -> None:
        names = batch[0].inputs.keys()
        merged = {n: np.concatenate([p.inputs[n] for p in batch]) if len(batch) > 1 else batch[0].inputs[n]
                  for n in names}  # fmt: skip
        if self.on_batch:
            self.on_batch(sum(p.rows for p in batch))
        try:
            result = await self.run(merged, batch[0].outputs)
        except Exception as exc:  # every waiting request gets the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        offset = 0
        for p in batch:
            part = {n: v[offset : offset + p.rows] for n, v in result.items()}
            offset += p.rows
            if not p.future.done():
                p.future.set_result(part)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        while self.queue:
            item = self.queue.popleft()
            if not item.future.done():
                item.future.set_exception(asyncio.CancelledError())
