"""Dynamic batching: requests that arrive within ``max_queue_delay`` are run as one batch (up to
``max_batch_size`` rows, executed at once when a preferred size is reached), then split back.

Requests are concatenated along the batch dimension only when their other dimensions, dtypes and
requested outputs agree; a request that does not fit the batch being formed waits for the next one, in
arrival order.

Failure containment: a worker never leaves a request waiting. Whatever goes wrong while a batch is
formed or run fails exactly that batch's requests with a clear error and the worker goes on with the next
one; a worker task that ends anyway (cancelled from outside, a bug) fails every queued request and is
restarted, up to :data:`MAX_RESTARTS` times, after which the batcher reports itself dead
(:attr:`DynamicBatcher.failure`) so that readiness says so and new requests are refused at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from modelseal.serve.errors import ServeError, unavailable

Tensors = dict[str, np.ndarray]
RunBatch = Callable[[Tensors, list[str]], Awaitable[Tensors]]
MAX_RESTARTS = 3
log = logging.getLogger("modelseal.serve")


def batch_aligned(outputs: dict[str, np.ndarray], rows: int) -> bool:
    """Whether every output has one row per input row (dim 0 = ``rows``), so that a batch of requests run
    together can be split back by rows."""
    return all(v.ndim > 0 and v.shape[0] == rows for v in outputs.values())


@dataclass(eq=False)  # identity, never field-wise comparison: the fields hold numpy arrays
class Pending:
    inputs: Tensors
    outputs: list[str]
    rows: int
    future: asyncio.Future[Tensors] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def signature(self) -> tuple[object, ...]:
        return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.inputs.items())), tuple(self.outputs)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class DynamicBatcher:
    def __init__(
        self,
        run: RunBatch,
        max_batch_size: int,
        max_delay_s: float,
        preferred: tuple[int, ...] = (),
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
        name: str = "",
    ) -> None:
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.preferred = set(preferred)
        self.on_batch = on_batch
        self.name = name or "model"
        self.queue: collections.deque[Pending] = collections.deque()
        self.arrived = asyncio.Event()
        self.closing = False
        self.restarts = 0
        self.failure = ""  # set when the workers died more than MAX_RESTARTS times: not ready
        self.tasks: list[asyncio.Task[None]] = []
        for _ in range(max(1, workers)):
            self._spawn()

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher {self.name}")
        task.add_done_callback(self._ended)
        self.tasks.append(task)

    @property
    def alive(self) -> bool:
        return not self.failure and all(not t.done() for t in self.tasks)

    async def submit(self, inputs: Tensors, outputs: list[str]) -> Tensors:
        if self.failure:
            raise unavailable(f"model {self.name}: {self.failure}")
        if self.closing:
            raise unavailable(f"model {self.name} is being unloaded")
        rows = next(iter(inputs.values())).shape[0]
        item = Pending(inputs, outputs, rows)
        self.queue.append(item)
        self.arrived.set()
        return await item.future

    def _take(self, batch: list[Pending]) -> None:
        """Move the oldest request and every later compatible one that fits into ``batch``; the others
        keep their order. No ``await`` inside: atomic for the other workers."""
        first = self.queue.popleft()
        batch.append(first)
        rows, key = first.rows, first.signature()
        kept: collections.deque[Pending] = collections.deque()
        while self.queue:
            item = self.queue.popleft()
            if rows + item.rows <= self.max_batch_size and item.signature() == key:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self.queue.extendleft(reversed(kept))

    def _ready(self, started: float) -> bool:
        rows = sum(p.rows for p in self.queue)
        return rows >= self.max_batch_size or rows in self.preferred or time.monotonic() - started >= self.max_delay_s

    async def _gather(self) -> None:
        """Wait for a request, then until the batch is full, preferred, or the delay expires."""
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

    async def _worker(self) -> None:
        while True:
            batch: list[Pending] = []
            try:
                await self._gather()
                if not self.queue:
                    continue  # another worker took them
                self._take(batch)
                await self._execute(batch)
            except asyncio.CancelledError:
                for p in batch:
                    p.fail(unavailable(f"model {self.name} was unloaded before the request ran"))
                raise
            except Exception as exc:  # whatever broke, this batch gets an answer and the worker goes on
                log.exception("dynamic batcher of model %s failed a batch of %d request(s)", self.name, len(batch))
                error = ServeError(500, f"the dynamic batcher of model {self.name} failed ({type(exc).__name__})")
                for p in batch:
                    p.fail(error)

    async def _execute(self, batch: list[Pending]) -> None:
        names = batch[0].inputs.keys()
        merged = {n: np.concatenate([p.inputs[n] for p in batch]) if len(batch) > 1 else batch[0].inputs[n]
                  for n in names}  # fmt: skip
        if self.on_batch:
            self.on_batch(sum(p.rows for p in batch))
        try:
            result = await self.run(merged, batch[0].outputs)
        except Exception as exc:  # every waiting request gets the failure (the caller maps it to a status)
            for p in batch:
                p.fail(exc)
            return
        if len(batch) > 1 and not batch_aligned(result, sum(p.rows for p in batch)):
            # an output that is not one row per input row (detections, a reduction over the batch): split,
            # it would hand one request's rows to another; each request runs alone instead
            log.warning("model %s: an output is not one row per input row; its requests run one by one", self.name)
            for p in batch:
                try:
                    alone = await self.run(p.inputs, p.outputs)
                except Exception as exc:
                    p.fail(exc)
                    continue
                if not p.future.done():
                    p.future.set_result(alone)
            return
        offset = 0
        for p in batch:
            part = {n: v[offset : offset + p.rows] for n, v in result.items()}
            offset += p.rows
            if not p.future.done():
                p.future.set_result(part)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A worker task ended: fine while closing; otherwise fail the queue (nothing may wait on a dead
        worker), then restart it, or declare the batcher dead after MAX_RESTARTS."""
        self.tasks.remove(task)
        if self.closing:
            return
        why = "was cancelled" if task.cancelled() else f"stopped ({type(task.exception()).__name__})"
        log.error("dynamic batcher worker of model %s %s", self.name, why)
        self._fail_queue(unavailable(f"model {self.name}: its dynamic batcher {why}; retry"))
        if self.restarts < MAX_RESTARTS:
            self.restarts += 1
            self._spawn()
        else:
            self.failure = f"its dynamic batcher {why} {self.restarts + 1} times; load the model again"
            log.error("model %s is not ready: %s", self.name, self.failure)

    def _fail_queue(self, exc: BaseException) -> None:
        while self.queue:
            self.queue.popleft().fail(exc)

    async def close(self) -> None:
        self.closing = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_queue(unavailable(f"model {self.name} was unloaded before the request ran"))
