"""Loaded models: load and unload, instances, dynamic batching, and running requests on them.

A sealed model's key comes from the host agent (or an identity file): the identity is resolved once, when
the manager is made, and each load opens the model's artifact once (:class:`~.source.ModelSource`) for
all its instances. When the agent drops a model's key, :mod:`.keywatch` unloads the model: its runtimes
are closed and their memory wiped and freed, requests get a clear ``UNAVAILABLE`` naming the reason, and
the model is retried every ``retry_s`` so that a re-grant brings it back without a restart. With the
agent as identity, requests are metered and held to the licence's limits (:mod:`.metering`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from modelseal.errors import KeyReleaseError, ModelsealError, UsageError
from modelseal.load.artifacts import resolve_identity
from modelseal.recipients.base import Identity
from modelseal.recipients.registry import IdentitySpec
from modelseal.serve import keywatch
from modelseal.serve.autocomplete import effective_config
from modelseal.serve.batching import DynamicBatcher, Tensors
from modelseal.serve.errors import ServeError, not_found, unavailable
from modelseal.serve.infer import runtime_refusal, validate
from modelseal.serve.metering import Charge, Metering, MeteringError
from modelseal.serve.metrics import UNKNOWN, Metrics
from modelseal.serve.repository import (
    MAX_INSTANCES,
    MAX_VERSIONS,
    ConfigError,
    ModelSpec,
    Repository,
    capped,
    read_labels,
    version_number,
)
from modelseal.serve.runtimes.base import Runtime, build
from modelseal.serve.source import open_source

log = logging.getLogger("modelseal.serve")


@dataclass
class Statistics:
    """Per model version, what ``ModelStatistics`` reports (Triton's names; durations in ns). ``queue`` is
    the wait for a free instance of each execution (a dynamic batch's forming time is in ``success``)."""

    success: list[int] = field(default_factory=lambda: [0, 0])  # [count, ns], end to end per request
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])  # per execution
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])  # per execution: the runtime's run
    inference_count: int = 0  # rows (batch entries) answered successfully
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [executions, compute ns]
    lock: threading.Lock = field(default_factory=threading.Lock)  # executions end on the instance threads

    def executed(self, rows: int, waited_ns: int, compute_ns: int) -> None:
        with self.lock:
            self._executed(rows, waited_ns, compute_ns)

    def _executed(self, rows: int, waited_ns: int, compute_ns: int) -> None:
        self.execution_count += 1
        for counter, ns in ((self.queue, waited_ns), (self.compute_infer, compute_ns)):
            counter[0] += 1
            counter[1] += ns
        batch = self.batches.setdefault(rows, [0, 0])
        batch[0] += 1
        batch[1] += compute_ns

    def answered(self, ok: bool, rows: int, ns: int) -> None:
        counter = self.success if ok else self.fail
        counter[0] += 1
        counter[1] += ns
        if ok:
            self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def report(self, name: str, version: int) -> dict[str, Any]:
        """Triton's JSON form of ``ModelStatistics`` (also the gRPC message's fields)."""

        def duration(counter: list[int]) -> dict[str, int]:
            return {"count": counter[0], "ns": counter[1]}

        zero = {"count": 0, "ns": 0}
        return {
            "name": name, "version": str(version), "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(self.success), "fail": duration(self.fail), "queue": duration(self.queue),
                "compute_input": zero, "compute_infer": duration(self.compute_infer), "compute_output": zero,
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": zero, "compute_infer": duration(counter), "compute_output": zero}
                for size, counter in sorted(self.batches.items())
            ],
        }  # fmt: skip


@dataclass
class LoadedModel:
    spec: ModelSpec  # completed from the model where its config left inputs or outputs out
    version: int
    runtimes: list[Runtime]
    keys: set[str]
    pool: ThreadPoolExecutor
    labels: dict[str, list[str]] = field(default_factory=dict)  # output name -> class labels
    idle: asyncio.Queue[Runtime | None] = field(default_factory=asyncio.Queue)  # None: closed
    batcher: DynamicBatcher | None = None
    in_flight: int = 0
    closed: bool = False
    stats: Statistics = field(default_factory=Statistics)

    async def execute(self, inputs: Tensors, outputs: list[str]) -> Tensors:
        """Run on a free instance, in the instance pool (never on the event loop). A request that still
        holds this model after it was unloaded is refused (503), not run on a closed pool."""
        rows = next(iter(inputs.values())).shape[0] if self.spec.batching and inputs else 1  # before: never
        asked = time.perf_counter_ns()  # leave between taking an instance and handing it back
        runtime = None if self.closed else await self.idle.get()
        if runtime is None or self.closed:
            self.idle.put_nowait(runtime)  # hands the instance (or the closed sentinel) to the next waiter,
            # which is refused in turn: every request waiting when the model closed is answered
            raise unavailable(f"model {self.spec.name} was unloaded")
        waited = time.perf_counter_ns() - asked

        def run() -> Tensors:
            started = time.perf_counter_ns()
            results = runtime.run(inputs, outputs)
            self.stats.executed(rows, waited, time.perf_counter_ns() - started)
            return results

        running = asyncio.get_running_loop().run_in_executor(self.pool, run)

        def release(done: asyncio.Future[Tensors]) -> None:
            # A cancelled caller (client gone, batch abandoned) must not free the instance while its thread
            # still runs on it: it goes back to the pool only when the run itself has ended.
            if not done.cancelled():
                done.exception()  # retrieved here, so an abandoned failure is not logged as never retrieved
            self.idle.put_nowait(runtime)

        running.add_done_callback(release)
        return await asyncio.shield(running)

    async def close(self) -> None:
        """Refuse new runs, let the runs in progress end (waited for on a thread, so the event loop keeps
        answering), then free the runtimes and wake every request still waiting for an instance."""
        self.closed = True
        if self.batcher is not None:
            await self.batcher.close()
        await asyncio.to_thread(self.pool.shutdown, True)
        for runtime in self.runtimes:
            runtime.close()
        self.runtimes.clear()
        while not self.idle.empty():
            self.idle.get_nowait()
        self.idle.put_nowait(None)


@dataclass
class ModelState:
    state: str = "UNAVAILABLE"  # READY, LOADING, UNAVAILABLE
    reason: str = ""
    retry: bool = False  # unloaded because its key went away: try again periodically


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` in a task of its own that a cancelled caller does not cancel."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an abandoned failure is still retrieved
    await asyncio.shield(task)


class ModelManager:
    """``identity``: an :class:`Identity` already resolved, or a spec (``None``: the environment's, as
    :func:`~modelseal.load.artifacts.resolve_identity` says) resolved here, once. A spec that cannot be
    resolved does not stop the server: it is each sealed model's load-failure reason, and is tried again at
the next load. The agent watched
    for revocations is ``agent_socket``, else the identity's own when it is an agent."""

    def __init__(
        self,
        repository: Repository,
        identity: IdentitySpec | None,
        metrics: Metrics,
        *,
        agent_socket: str | None = None,
        key_check_s: float = 5,
        retry_s: float = 30,
        threads: int = 0,
        trusted_signers: list[str] | None = None,
        usage_sync_s: float = 1.0,
    ) -> None:
        self.repository, self.metrics = repository, metrics
        self.identity_spec = identity
        self.identity: Identity | None = None
        self.identity_error: ModelsealError | None = None
        self.usage_sync_s = usage_sync_s
        self.metering: Metering | None = None  # set with an agent identity (see _resolve_identity)
        self._resolve_identity()
        self.agent_socket = agent_socket or keywatch.agent_socket(self.identity)
        self.key_check_s, self.retry_s, self.threads = key_check_s, retry_s, threads
        self.trusted_signers = list(trusted_signers or [])
        self.models: dict[str, dict[int, LoadedModel]] = {}  # name -> its served versions
        self.states: dict[str, ModelState] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self._watcher: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.agent_socket and self._watcher is None:
            watching = keywatch.watch(self, self.agent_socket, self.key_check_s, self.retry_s)
            self._watcher = asyncio.get_running_loop().create_task(watching, name="key watcher")
        if self.metering is not None:
            self.metering.start(self.key_ids)

    async def close(self) -> None:
        """Stop watching, report the last usage counts (the server drained its requests first), unload."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.metering is not None:
            await self.metering.close()
        for name in list(self.models):
            await self.unload(name, "server shutdown")

    async def load(self, name: str, config: str | None = None) -> None:
        """Load (or reload) the versions of ``name`` its version policy names (the newest by default);
        ``config``: a JSON config used instead of the model's file (a repository load request's). Errors
        are recorded in its state and raised: 404 when the repository has no such model directory, 400
        when its config is unusable (or disagrees with the model), 503 when the model cannot be loaded
        (key refused, runtime refused it). Versions are all-or-nothing: a reload that fails keeps every
        version loaded before serving.

        The load runs to its end even if the caller goes away (aiohttp cancels the handler of a client
        that disconnects): cancelled halfway, it left the model LOADING for good, and the instances
        being built, decrypted weights included, installed nowhere and closed by nobody."""
        await _to_the_end(self._load(name, config))

    async def unload(self, name: str, reason: str, retry: bool = False) -> None:
        """Stop serving ``name`` and free its runtimes (weights and, for sealed models, nothing on disk);
        like :meth:`load`, it runs to its end even if the caller goes away."""
        await _to_the_end(self._unload(name, reason, retry))

    async def _load(self, name: str, config: str | None) -> None:
        async with self.locks.setdefault(name, asyncio.Lock()):
            if name not in self.repository.names():
                raise not_found(f"model {name!r} is not in the repository {self.repository.root}")
            state = self.states.setdefault(name, ModelState())
            try:
                spec = await asyncio.to_thread(self.repository.spec, name, config)  # file reads off the loop
                versions = spec.versions()
                if not versions:
                    named = "" if spec.version_policy.kind == "latest" else " that its version_policy names"
                    raise ConfigError(f"model {name} has no numeric version directory{named} in {spec.path}")
                if len(versions) > MAX_VERSIONS:  # each version holds its own decrypted weights
                    raise ConfigError(f"model {name}: its version_policy names {len(versions)} versions; "
                                      f"at most {MAX_VERSIONS} are served at once")  # fmt: skip
                if len(versions) * spec.instances > MAX_INSTANCES:
                    raise ConfigError(f"model {name}: {len(versions)} versions of {spec.instances} instances each; "
                                      f"at most {MAX_INSTANCES} instances in all")  # fmt: skip
            except ModelsealError as exc:
                raise self._load_failed(name, state, exc) from None
            state.state = "LOADING"  # keeps the reason it was unavailable until the load succeeds
            started = time.monotonic()
            loaded: dict[int, LoadedModel] = {}
            try:
                for version in versions:
                    loaded[version] = await asyncio.to_thread(self._build, spec, version)
                await self._licensed(name, loaded)
            except Exception as exc:  # whatever failed, the server keeps serving the other models
                for model in loaded.values():
                    await model.close()
                raise self._load_failed(name, state, exc) from None
            for old in self.models.pop(name, {}).values():
                await old.close()
            for model in loaded.values():
                self._start_model(model)
            self.models[name] = loaded
            state.state, state.reason, state.retry = "READY", "", False
            self.metrics.loads.labels(name, "ok").inc()
            if any(model.keys for model in loaded.values()):
                self.metrics.key_fetches.labels(name, "ok").inc()
            self.metrics.load_seconds.labels(name).observe(time.monotonic() - started)
            self.metrics.ready.labels(name).set(1)
            newest = loaded[versions[-1]]
            log.info("model %s version %s ready (%d instance(s), %s)", name, ", ".join(map(str, loaded)),
                     len(newest.runtimes), newest.runtimes[0].device)  # fmt: skip

    def _load_failed(self, name: str, state: ModelState, exc: Exception) -> ServeError:
        """Record (state, index, log) why a load failed; a failed *reload* keeps the loaded version serving."""
        status = 400 if isinstance(exc, ConfigError) else 503
        if isinstance(exc, KeyReleaseError):
            reason, label, retry = f"key refused: {exc}", "key_refused", True
            self.metrics.key_fetches.labels(name, exc.code).inc()
        elif isinstance(exc, MeteringError):  # not served unmetered; tried again like a dropped key
            reason, label, retry = f"usage metering unavailable: {exc}", "metering_unavailable", True
        elif isinstance(exc, ModelsealError):
            reason, label, retry = str(exc), "failed", False
        else:  # a framework refusing the model: log the traceback, tell clients only the kind
            log.exception("loading model %s failed", name)
            reason, label, retry = f"the runtime refused it: {type(exc).__name__}", "failed", False
        reason = capped(reason)  # a parser may quote (or expand) its input: index and log get 1,000 chars
        self.metrics.loads.labels(name, label).inc()
        if name in self.models:
            state.state, state.reason = (
                "READY",
                f"reload failed, still serving version(s) {', '.join(map(str, self.models[name]))}: {reason}",
            )
        else:
            state.state, state.reason, state.retry = "UNAVAILABLE", reason, retry
        log.error("model %s cannot be loaded: %s", name, reason)
        return ServeError(status, f"model {name} cannot be loaded: {reason}")

    def _build(self, spec: ModelSpec, version: int) -> LoadedModel:
        """Open the version's artifact once, unlock it once, and build every instance from it."""
        artifact = spec.artifact(version)
        labels = read_labels(spec)
        runtimes: list[Runtime] = []
        with open_source(artifact, self._identity, self.trusted_signers) as source:
            if not source.sealed and self.trusted_signers:
                raise UsageError(f"{artifact} is not sealed, so it carries no signature from a trusted signer")
            keys = source.key_ids()
            try:
                for _ in range(spec.instances):  # the first completes the config (if it must) for the others
                    runtime, spec = build(spec, source, self.threads, self.repository.default_max_batch_size)
                    runtimes.append(runtime)
            except BaseException:
                for r in runtimes:
                    r.close()
                raise
        pool = ThreadPoolExecutor(max_workers=spec.instances, thread_name_prefix=f"model-{spec.name}-{version}")
        return LoadedModel(spec, version, runtimes, keys, pool, labels)

    def _resolve_identity(self) -> None:
        try:
            self.identity, self.identity_error = resolve_identity(self.identity_spec), None
        except ModelsealError as exc:
            self.identity_error = exc
            return
        socket = keywatch.agent_socket(self.identity)
        if socket is not None and self.metering is None:
            self.metering = Metering(socket, self.metrics, self.usage_sync_s)

    async def _licensed(self, name: str, loaded: dict[int, LoadedModel]) -> None:
        """With metering, before the versions are served: the agent takes what is counted and states their
        licences (the limits the first request is held to); :class:`MeteringError` if it cannot."""
        keys = [model.keys for model in loaded.values() if model.keys]
        if self.metering is None or not keys:
            return
        await self.metering.sync()
        for key_ids in keys:
            if self.metering.charged_key(key_ids) is None:
                raise MeteringError(f"the agent states no licence for model {name}'s key {sorted(key_ids)[0]}")

    def _identity(self) -> Identity:
        """The server's identity, for a sealed artifact; why there is none, when it could not be resolved.

        A spec that failed is tried again at each load (a key file that appears later, a variable set in
        a restarted unit's environment file), so a retried or requested load can succeed; once resolved
        it is kept for the life of the server."""
        if self.identity is None:
            self._resolve_identity()
        if self.identity is None:
            raise (self.identity_error or UsageError("no identity")).with_traceback(None)
        return self.identity

    def _start_model(self, model: LoadedModel) -> None:
        for runtime in model.runtimes:
            model.idle.put_nowait(runtime)
        spec = model.spec
        if spec.max_queue_delay_s is not None:
            model.batcher = DynamicBatcher(
                model.execute, spec.max_batch_size, spec.max_queue_delay_s, spec.preferred_batch_sizes,
                workers=spec.instances, on_batch=self.metrics.batch_size.labels(spec.name).observe, name=spec.name,
            )  # fmt: skip

    async def _unload(self, name: str, reason: str, retry: bool) -> None:
        async with self.locks.setdefault(name, asyncio.Lock()):
            versions = self.models.pop(name, {})
            state = self.states.setdefault(name, ModelState())
            state.state, state.reason, state.retry = "UNAVAILABLE", reason, retry
            if not versions:
                return
            self.metrics.ready.labels(name).set(0)
            self.metrics.unloads.labels(name, "key_dropped" if retry else "requested").inc()
            for model in versions.values():
                await model.close()
            del model, versions
            gc.collect()
            log.warning("model %s unloaded: %s", name, reason)

    # --- requests ---------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded ``version`` of ``name`` (``""``: the newest loaded): 404 for an unknown model or a
        version not loaded, 503 for a model not ready."""
        versions = self.models.get(name)
        if not versions:
            state = self.states.get(name)
            if state is None and name not in self.repository.names():
                raise not_found(f"unknown model {name!r}")
            reason = state.reason if state and state.reason else ("loading" if state else "not loaded")
            raise unavailable(f"model {name} is not ready: {reason}")
        if version:
            number = version_number(version)
            model = versions.get(number) if number is not None else None
            if model is None:
                ready = ", ".join(map(str, versions))
                raise not_found(f"model {name} has no ready version {version[:40]!r} (ready: {ready})")
        else:
            model = versions[max(versions)]
        if model.batcher is not None and not model.batcher.alive:
            raise unavailable(f"model {name} is not ready: {model.batcher.failure or 'its dynamic batcher stopped'}")
        return model

    def labels(self, name: str, version: str) -> tuple[str, str]:
        """The metric labels of a request for ``name``/``version``: a model the repository has (one the
        server tried to load) and a version of it being served; anything else a client names is unknown
        (:class:`~modelseal.serve.metrics.Metrics`)."""
        if name not in self.states:
            return UNKNOWN, ""
        served = self.models.get(name, {})
        return name, version if version_number(version) in served else ""

    def dead_batchers(self) -> list[str]:
        """Loaded models whose dynamic batcher cannot answer requests (readiness reports them)."""
        return [n for n, m in self.loaded() if m.batcher is not None and not m.batcher.alive]

    def loaded(self) -> list[tuple[str, LoadedModel]]:
        """Every loaded (name, version) pair, by name then version."""
        return [(name, versions[v]) for name, versions in sorted(self.models.items()) for v in sorted(versions)]

    async def infer(
        self, model: LoadedModel, inputs: Tensors, outputs: list[str], *, client: str = "anonymous"
    ) -> Tensors:
        """Run a request of ``client`` (who rate limits count: :func:`.metering.rate_client`).
        A metered model's request is admitted against its licence once validated, before it runs, and
        counted only if it is answered (:mod:`.metering`)."""
        started, ok = time.perf_counter_ns(), False
        rows = 1
        charge: Charge | None = None
        model.in_flight += 1
        try:
            wanted = validate(model.spec, inputs, outputs)
            rows = next(iter(inputs.values())).shape[0] if model.spec.batching else 1
            if self.metering is not None:
                charge = self.metering.admit(model.spec.name, model.keys, client, rows)
            if model.batcher is not None:
                results = await model.batcher.submit(inputs, wanted)
            else:
                if model.spec.batching:
                    self.metrics.batch_size.labels(model.spec.name).observe(rows)
                results = await model.execute(inputs, wanted)
            ok = True
            return results
        except ServeError:
            raise
        except Exception as exc:  # a runtime failure: report the kind, never tensor contents
            refused = runtime_refusal(exc)
            if refused is not None:
                raise refused from None
            log.exception("inference on %s failed", model.spec.name)
            why = str(exc) if isinstance(exc, ModelsealError) else type(exc).__name__  # ours never hold data
            raise ServeError(500, f"inference on {model.spec.name} failed: {why}") from None
        finally:
            model.in_flight -= 1
            if charge is not None and self.metering is not None:
                self.metering.done(charge, ok)
            model.stats.answered(ok, rows, time.perf_counter_ns() - started)

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """One row per loaded version (as Triton lists them), one for each model with none loaded."""
        rows = []
        for name in self.repository.names():
            state = self.states.get(name, ModelState())
            versions = self.models.get(name, {})
            if ready_only and not versions:
                continue
            served: list[LoadedModel | None] = [versions[v] for v in sorted(versions)]
            for model in served or [None]:
                row = {"name": name, "version": str(model.version) if model else "", "state": state.state}
                if state.reason:
                    row["reason"] = state.reason
                if model is not None and model.batcher is not None and not model.batcher.alive:
                    row["state"], row["reason"] = "UNAVAILABLE", model.batcher.failure or "its dynamic batcher stopped"
                rows.append(row)
        return rows

    def metadata(self, model: LoadedModel) -> dict[str, Any]:
        spec = model.spec
        return {
            "name": spec.name,
            "versions": [str(v) for v in sorted(self.models.get(spec.name, {model.version: model}))],
            "platform": spec.platform,
            "inputs": [t.metadata(spec.batching) for t in spec.inputs],
            "outputs": [t.metadata(spec.batching) for t in spec.outputs],
        }

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(m.in_flight for _, m in self.loaded()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # --- key revocation (what keywatch needs) ---------------------------------------------------------

    def key_ids(self) -> dict[str, set[str]]:
        return {name: set().union(*(m.keys for m in versions.values())) for name, versions in self.models.items()}

    def config(self, model: LoadedModel) -> dict[str, Any]:
        """The loaded model's config, completed from the model where it had to be (Triton's JSON form)."""
        return effective_config(model.spec, model.runtimes[0].device if model.runtimes else "cpu")

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """``ModelStatistics`` of the loaded versions of ``name`` (``""``: every model; ``version``: only
        that one, 404 when it is not loaded)."""
        if name:
            if version:
                return [self.get(name, version).stats.report(name, int(version))]
            self.get(name)
            return [m.stats.report(name, m.version) for n, m in self.loaded() if n == name]
        return [m.stats.report(n, m.version) for n, m in self.loaded()]

    async def retry_dropped(self) -> None:
        for name, state in list(self.states.items()):
            if state.retry and name not in self.models:
                with contextlib.suppress(ServeError):
                    await self.load(name)
