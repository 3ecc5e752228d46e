"""A sealed model loaded for a serving engine that is not ``modelseal serve`` (Triton, PyTriton).

The model is opened the way ``modelseal serve`` opens one (:func:`~modelseal.serve.source.open_source`:
one header parse, one key unwrap, signature checked) and built by the same runtime
(:func:`~modelseal.serve.runtimes.base.build`: ONNX Runtime, TorchScript, a state dict), so the engine gets
exactly what serve would run, decrypted in memory only. With a key from the host agent, a
:class:`~modelseal.load.leasewatch.LeaseWatch` asks the agent every ``key_check_s`` whether it still
releases the key: on a refusal (revoked, expired, no longer granted) the model is closed at once (its
runtime wipes what it holds) and every later request is refused with the reason. The engine keeps running
its other models; only this one stops.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelseal.errors import ModelsealError, UsageError
from modelseal.load.artifacts import resolve_identity
from modelseal.load.leasewatch import LeaseWatch
from modelseal.release.identity import AgentIdentity
from modelseal.serve.batching import batch_aligned
from modelseal.serve.infer import runtime_refusal
from modelseal.serve.repository import ModelSpec
from modelseal.serve.runtimes.base import Runtime, build
from modelseal.serve.source import ModelSource, open_source
from modelseal.triton.settings import Settings

log = logging.getLogger("modelseal.triton")
Tensors = dict[str, np.ndarray]


class KeyWatch(LeaseWatch):
    """A :class:`LeaseWatch` on which the agent's *refusal* acts at the next check, and only its silence
    waits out the grace period: a revoked key must stop the model within one check, while an agent that
    restarts must not."""

    def check(self) -> str | None:
        reason = super().check()
        return reason if reason is not None else (self.problem if self.refused else None)


def watched_keys(source: ModelSource) -> set[tuple[str, str]]:
    """(key id, model) of each key-service stanza of the source: what the watch asks the agent about."""
    stanzas = [s for art in source.artifacts.values() for s in art.envelope.recipients]
    keyserver = [s for s in stanzas if s.get("type") == "keyserver" and isinstance(s.get("key_id"), str)]
    return {(s["key_id"], str(s.get("model"))) for s in keyserver}


class SealedModel:
    """One instance of a sealed model; see the module docstring. ``run`` and :meth:`close` may be called
    from different threads (the engine's and the watch's): a lock keeps a run from seeing a closed model."""

    def __init__(self, spec: ModelSpec, runtime: Runtime, watch: LeaseWatch | None) -> None:
        self.spec, self.runtime, self.watch = spec, runtime, watch
        self.refusal: str | None = None  # why the model no longer serves (None while it does)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: ModelSpec, artifact: Path, settings: Settings) -> SealedModel:
        """Open ``artifact`` once, decrypt it in memory, build its runtime (completing ``spec`` from the
        model where it leaves inputs or outputs out), and start the key watch."""
        identity = resolve_identity(settings.identity)
        with open_source(artifact, lambda: identity, list(settings.trusted_signers)) as source:
            if not source.sealed:
                raise UsageError(f"{artifact} is not sealed: this model serves sealed files only")
            runtime, spec = build(spec, source, settings.threads)
            watched = watched_keys(source)
        model = cls(spec, runtime, None)
        if isinstance(identity, AgentIdentity) and watched and settings.key_check_s == 0:
            log.warning("modelseal: model %s: key_check_s is 0, so a revoked key is not noticed", spec.name)
        if isinstance(identity, AgentIdentity) and watched and settings.key_check_s > 0:
            check_s, grace_s = settings.key_check_s, settings.grace_s
            model.watch = KeyWatch(identity.socket, watched, check_s, grace_s, model.refuse, log=log)
            model.watch.start()
        return model

    def refuse(self, reason: str) -> None:
        """Stop serving for good (the key was refused): close the runtime, which wipes what it holds."""
        log.error("modelseal: model %s no longer serves: %s", self.spec.name, reason)
        with self._lock:
            self.refusal = f"model {self.spec.name} is not ready: its key was refused ({reason})"
            self._close()

    def run(self, inputs: Tensors, outputs: Sequence[str]) -> Tensors:
        with self._lock:
            if self.refusal is not None:
                raise ModelsealError(self.refusal)
            return self.runtime.run(inputs, list(outputs or [t.name for t in self.spec.outputs]))

    def run_batch(self, requests: Sequence[tuple[Tensors, Sequence[str]]]) -> list[Tensors | Exception]:
        """Run the requests Triton handed over at once. For a batching model, requests asking for the
        same outputs with the same per-row shapes are concatenated along the batch dimension and run
        as one, then split back; each request gets its outputs or the exception that failed it."""
        results: list[Tensors | Exception] = [UsageError("not run")] * len(requests)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (inputs, outputs) in enumerate(requests):
            shapes = tuple(sorted((n, a.shape[1:], a.dtype.str) for n, a in inputs.items()))
            key = (tuple(outputs), shapes) if self.spec.batching else (i,)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            try:
                if len(members) == 1:
                    results[members[0]] = self.run(*requests[members[0]])
                    continue
                rows = [next(iter(requests[i][0].values())).shape[0] for i in members]
                joined = {n: np.concatenate([requests[i][0][n] for i in members]) for n in requests[members[0]][0]}
                out = self.run(joined, requests[members[0]][1])
                if not batch_aligned(out, sum(rows)):  # splitting it would hand rows to the wrong requests
                    log.warning("modelseal: model %s: an output is not one row per input row; running its "
                                "requests one by one", self.spec.name)  # fmt: skip
                    for i in members:
                        results[i] = self._run_one(requests[i])
                    continue
                bounds = np.cumsum(rows)[:-1]
                pieces = {n: np.split(a, bounds) for n, a in out.items()}
                for j, i in enumerate(members):
                    results[i] = {n: parts[j] for n, parts in pieces.items()}
            except Exception as exc:  # each request of the group gets the failure
                for i in members:
                    results[i] = exc
        return results

    def _run_one(self, request: tuple[Tensors, Sequence[str]]) -> Tensors | Exception:
        try:
            return self.run(*request)
        except Exception as exc:
            return exc

    def close(self) -> None:
        """Stop the watch and free the model (the runtime wipes its buffers and zeroes its weights)."""
        if self.watch is not None:
            self.watch.stop()
        with self._lock:
            if self.refusal is None:
                self.refusal = f"model {self.spec.name} was unloaded"
            self._close()

    def _close(self) -> None:
        runtime, self.runtime = self.runtime, None  # type: ignore[assignment]
        if runtime is not None:
            runtime.close()
        del runtime
        gc.collect()


def client_message(exc: Exception) -> str:
    """A failure as one line for a client: ours say what to do; a framework's is named by its type only
    (its text may quote tensor values), unless it is a refusal of the request's values (400 in serve)."""
    if isinstance(exc, ModelsealError):
        return str(exc)
    refused = runtime_refusal(exc)
    return str(refused) if refused is not None else f"inference failed: {type(exc).__name__}"


def version_of(text: str | int) -> int:
    """Triton's model version (a string of digits) as a number."""
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"model version {str(text)[:20]!r} is not a number") from None
