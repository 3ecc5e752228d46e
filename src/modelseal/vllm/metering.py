"""Usage metering for sealed LLMs in vLLM: requests, items and input/output tokens, per licence.

When the model was loaded through the host agent (an ``agent:`` identity) and the ``meter`` loader option
does not turn it off, the process where vLLM builds its configuration (``vllm serve``'s front end, or the
process calling ``LLM(...)``) keeps a :class:`~modelseal.release.meter.Meter` for the model's key. Counts
go to the agent every second (a daemon thread) and at exit; the agent appends them to its signed usage
log, which travels to the key service with every lease renewal (docs/licensing.md).

Where the counts come from: vLLM's front end turns engine outputs into per-iteration statistics
(``IterationStats``) and hands them to its *stat loggers*, the interface vLLM offers for custom metrics
(``vllm.v1.metrics.loggers.StatLoggerBase``). :class:`MeterStatLogger` is one. A request and its prompt's
tokens count when the engine returns the request's first token (one ``time_to_first_tokens_iter`` entry
per request; ``prompt_token_stats.total`` is the sum of those prompts), and output tokens count as they
are generated (``num_generation_tokens``). Not from vLLM's finished-request statistics: vLLM records none
for an aborted request (a client that disconnects mid-stream), so counting at the end would let a client
take tokens unmetered. A request that never got its first token did no work and is not counted. One
request is one item; ``n > 1`` sampling runs ``n`` engine requests and counts ``n``, each with its prompt.

How the logger gets in (:func:`install`, where the plugin stages a metered model): vLLM's own route for
custom loggers, the ``vllm.stat_logger_plugins`` entry point, is read by ``AsyncLLM`` (``vllm serve``)
only, not by the ``LLMEngine`` under ``LLM(...)``, and would add a logger to every vLLM engine of the
environment; so the plugin adds :class:`MeterStatLogger` to vLLM's ``StatLoggerManager`` (which both
engines build) for a metered sealed model only, and turns vLLM's statistics on for it
(``disable_log_stats`` off: ``LLM(...)`` has them off by default).

Quotas: vLLM has no admission hook for plugins, but ``vllm serve`` takes ASGI middleware
(``--middleware modelseal.vllm.metering.QuotaMiddleware``): it refuses an inference request with HTTP 429
and the limit named once the licence's ``max_requests``/``max_items``/``max_tokens`` of the period is used
up, or the client (its address) passes the licence's rate. Without it, and under ``LLM(...)``, nothing
refuses a request in the engine: the key service re-checks the reported usage at every renewal and
renews no lease past the quota, so the engine stops when its lease ends (the lease watchdog).
"""

from __future__ import annotations

import atexit
import json
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.metrics.loggers import StatLoggerBase

from modelseal.errors import ModelsealError, UsageError
from modelseal.release.identity import AgentIdentity
from modelseal.release.meter import LimitExceeded, Meter
from modelseal.release.terms import Usage
from modelseal.vllm.options import LOAD_FORMAT, LoaderOptions

log = init_logger("vllm.modelseal")
SYNC_S = 1.0
"""How often counts go to the agent (and the licence's terms and usage come back)."""
CLOSE_TIMEOUT_S = 5.0
NOT_INFERENCE = frozenset({"/tokenize", "/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
"""POST paths the quota middleware lets through: they run no model."""

_plans: dict[str, tuple[str, frozenset[str]]] = {}  # sealed directory -> (agent socket, its key-service keys)
_meterings: dict[str, Metering] = {}  # sealed directory -> its meter in this process


def plan(model: str, opts: LoaderOptions, identity: object, keys: Iterable[str]) -> bool:
    """Decide, where the configuration is staged, whether ``model`` is metered here (True: vLLM's
    statistics must be on). ``keys`` are the key-service keys it is sealed to."""
    keys = frozenset(keys)
    if opts.meter is False:
        return False
    if not isinstance(identity, AgentIdentity) or not keys:
        if opts.meter:
            raise UsageError(
                f"{LOAD_FORMAT} loader option 'meter' needs keys from the host agent (an agent: identity and a model "
                "sealed to the key service): usage is reported to the agent"
            )
        return False
    _plans[model] = (identity.socket, keys)
    return True


class Metering:
    """One sealed model's meter in this process: its counts, the thread that reports them, its limits.

    The model may be sealed to several key-service keys; counts go to the one the agent holds (known
    after the first report), and wait here until then."""

    def __init__(self, socket: str, keys: frozenset[str], interval: float = SYNC_S) -> None:
        self.meter = Meter(socket)
        self.keys = keys
        self.key_id: str | None = None
        self._lock = threading.Lock()
        self._waiting = Usage()  # counted before the key was known
        self._running = 0  # requests the quota middleware admitted that have not ended
        self._failing = False
        self._closed = threading.Event()
        self.sync(timeout=CLOSE_TIMEOUT_S)  # the licence's terms and usage before the first request
        if not self.meter.metering:
            log.warning("modelseal: the agent at %s keeps no usage log: this engine's usage is not recorded", socket)
        self._thread = threading.Thread(target=self._run, args=(interval,), name="modelseal-meter", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def count(self, usage: Usage) -> None:
        with self._lock:
            if self.key_id is None:
                self._waiting = self._waiting + usage
                return
        self.meter.record(self.key_id, usage)

    def admit(self, client: str, weight: int = 1) -> None:
        """Raise :class:`LimitExceeded` when an HTTP request that makes ``weight`` engine requests (prompts
        times ``n``) would pass the licence's limits now (each has at least one prompt token, so a token
        quota used up exactly refuses the next one), counting the admitted ones still running as well;
        pair with :meth:`release`. Until the agent has stated the licence, nothing is admitted."""
        if self.key_id is None:
            raise LimitExceeded("licence", "the model's licence is not known yet (the agent has not answered)", 1.0)
        licence = self.meter.licences.get(self.key_id)
        if licence is not None and licence.terms.metered and not self.meter.metering:
            raise LimitExceeded("licence", "the model is licensed metered, but the agent keeps no usage log", 60.0)
        with self._lock:
            running = self._running
        k = running + weight
        self.meter.admit(self.key_id, client, Usage(requests=k, items=k, input_tokens=k))
        with self._lock:
            self._running += weight

    def release(self, weight: int = 1) -> None:
        """An admitted request ended (its usage is counted by the stat logger as it runs)."""
        with self._lock:
            self._running = max(0, self._running - weight)

    def used(self) -> Usage | None:
        return None if self.key_id is None else self.meter.used(self.key_id)

    def sync(self, timeout: float = 10) -> bool:
        """Report to the agent; False (logged once per outage) if it cannot be reached or refuses: the
        counts stay here for the next try."""
        try:
            self.meter.sync(timeout)
        except (ModelsealError, OSError) as exc:
            if not self._failing:
                log.warning("modelseal: cannot report usage to the agent (kept, retried every %g s): %s", SYNC_S, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("modelseal: usage reports reach the agent again")
            self._failing = False
        if self.key_id is None:
            held = sorted(self.keys & set(self.meter.licences))
            if held:
                with self._lock:
                    self.key_id, waiting, self._waiting = held[0], self._waiting, Usage()
                self.meter.record(held[0], waiting)  # reported at the next sync
        return True

    def _run(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.sync()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread and report what is left (at exit, and before a stop on a revoked key)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sync(timeout)


def metering_for(vllm_config: VllmConfig) -> Metering | None:
    """This process's meter for the engine ``vllm_config`` describes (made once), None if not metered."""
    if vllm_config.load_config.load_format != LOAD_FORMAT:
        return None
    model = vllm_config.model_config.model_weights or vllm_config.model_config.model
    if model not in _meterings:
        planned = _plans.get(model)
        if planned is None:
            return None
        _meterings[model] = Metering(*planned)
    return _meterings[model]


def close_all() -> None:
    for metering in _meterings.values():
        metering.close(timeout=2)


class MeterStatLogger(StatLoggerBase):
    """A vLLM stat logger that counts each iteration's requests and tokens (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.metering = metering_for(vllm_config)

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if iteration_stats is None or self.metering is None:
            return
        started = len(iteration_stats.time_to_first_tokens_iter)
        usage = Usage(
            requests=started, items=started,
            input_tokens=iteration_stats.prompt_token_stats.total, output_tokens=iteration_stats.num_generation_tokens,
        )  # fmt: skip
        self.metering.count(usage)

    def log_engine_initialized(self) -> None:
        if self.metering is not None:
            log.info("modelseal: metering requests and tokens for key %s", self.metering.key_id or "(not yet known)")


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class QuotaMiddleware:
    """ASGI middleware for ``vllm serve --middleware modelseal.vllm.metering.QuotaMiddleware``: an
    inference request (a POST other than :data:`NOT_INFERENCE`) past a licence limit gets HTTP 429, an
    OpenAI-style error naming the limit, and ``Retry-After``. A request that starts within the limits
    runs to its end: its tokens are known only then."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST" and scope.get("path") not in NOT_INFERENCE:
            client = scope.get("client")
            body = await _body(receive)
            if body is None:
                await _refuse(send, LimitExceeded("size", f"a request body is at most {MAX_BODY} bytes here", 1.0))
                return
            weight = engine_requests(body)
            admitted: list[Metering] = []
            try:
                for metering in list(_meterings.values()):
                    metering.admit(str(client[0]) if client else "unknown", weight)
                    admitted.append(metering)
            except LimitExceeded as exc:
                for metering in admitted:
                    metering.release(weight)
                await _refuse(send, exc)
                return
            try:
                await self.app(scope, _replay(body, receive), send)
            finally:
                for metering in admitted:
                    metering.release(weight)
            return
        await self.app(scope, receive, send)


MAX_BODY = 64 << 20  # what the quota middleware reads of a request body to count its prompts
MAX_N = 1 << 14


def engine_requests(body: bytes) -> int:
    """How many engine requests an OpenAI request body makes: its prompts (a completion's ``prompt`` may
    be a list of strings or of token lists; a chat is one) times ``n``; 1 for a body it cannot read
    (vLLM answers that with a 400)."""
    try:
        request = json.loads(body)
    except ValueError:
        return 1
    if not isinstance(request, dict):
        return 1
    n = request.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1
    prompt = request.get("prompt")
    prompts = 1
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompts = len(prompt)  # several prompts (strings, or lists of token ids); a flat list is one
    return prompts * n


async def _body(receive: Receive) -> bytes | None:
    """The whole request body (None past :data:`MAX_BODY`)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message.get("type") != "http.request":
            break
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then whatever the connection says next."""
    sent = False

    async def replayed() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(send: Send, exc: LimitExceeded) -> None:
    kind = {"rate": "rate_limit_exceeded", "licence": "service_unavailable", "size": "request_too_large"}.get(
        exc.kind, "quota_exceeded"
    )
    status = {"licence": 503, "size": 413}.get(exc.kind, 429)
    body = json.dumps({"error": {"message": str(exc), "type": kind, "param": None, "code": status}}).encode()
    headers = [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, round(exc.retry_after))).encode()),
    ]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install() -> None:
    """Add :class:`MeterStatLogger` to the stat loggers of every engine built in this process that is
    metered (called where a metered model is staged; idempotent)."""
    from vllm.v1.metrics import loggers

    manager = loggers.StatLoggerManager
    if getattr(manager.__init__, "_modelseal", False):
        return
    original = manager.__init__

    def init(self: Any, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        if metering_for(vllm_config) is not None:
            if len(args) >= 2:  # (engine_idxs, custom_stat_loggers, ...) given by position
                args = (args[0], [*(args[1] or []), MeterStatLogger], *args[2:])
            else:
                kwargs["custom_stat_loggers"] = [*(kwargs.get("custom_stat_loggers") or []), MeterStatLogger]
        original(self, vllm_config, *args, **kwargs)

    init._modelseal = True  # type: ignore[attr-defined]
    manager.__init__ = init  # type: ignore[method-assign]
