"""A Ray Serve replica of a sealed model: made non-dumpable, the model loaded in this process with serve's
loader and runtime (:class:`~modelseal.triton.sealed.SealedModel`) and the key from the node's agent,
wiped when the agent refuses the key, loaded again every ``retry_s`` while it does."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal.errors import ModelsealError, one_line
from modelseal.ray.args import replica_args
from modelseal.ray.endpoint import REPLICA_HEADER, Endpoint, json_answer, read_body

if TYPE_CHECKING:
    from modelseal.triton.sealed import SealedModel

log = logging.getLogger("modelseal.ray")


def load_model(args: Mapping[str, Any]) -> SealedModel:
    """Open and load the sealed model of checked ``args`` (:func:`replica_args`) in this process, with
    serve's loader and runtime and the key watch; a framework's refusal becomes one line."""
    from modelseal.serve.repository import ModelSpec
    from modelseal.triton.layout import tensor_option
    from modelseal.triton.sealed import SealedModel
    from modelseal.triton.settings import Settings, guess_platform

    sealed = Path(args["sealed"])
    settings = Settings(identity=args["identity"], key_check_s=args["key_check_s"], grace_s=args["grace_s"],
                        threads=args["threads"], trusted_signers=tuple(args["trusted_signers"]))  # fmt: skip
    platform = args["platform"] or guess_platform(sealed.parent, sealed.name)
    spec = ModelSpec(args["name"], sealed.parent, platform, args["max_batch_size"],
                     tuple(tensor_option(t) for t in args["inputs"]), tuple(tensor_option(t) for t in args["outputs"]),
                     parameters={"entry_point": args["entry_point"]} if args["entry_point"] else {})  # fmt: skip
    try:
        return SealedModel.load(spec, sealed, settings)
    except ModelsealError:
        raise
    except Exception as exc:  # a framework refusing the model: its type and first line
        raise ModelsealError(f"model {spec.name}: the runtime refused the model: {one_line(exc)}") from None


def replica_id() -> str:
    """This Serve replica's id (``local`` outside a replica)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not in a replica (a test calling the class directly)
        return "local"


class SealedReplica:
    """One Serve replica of a sealed model (built by :func:`deployment`; see the module docstring)."""

    def __init__(self, sealed: str, name: str, identity: str | None = None, **settings: Any) -> None:
        from modelseal.memory.locked import harden_process

        harden_process()  # decrypted weights will live in this worker: no core dumps, no ptrace by others
        # checked again: a deployment from a Serve config file does not pass through deployment()
        self.args = replica_args(sealed, name=name, identity=identity, **settings)
        self.replica = replica_id()
        started = time.monotonic()
        try:
            self.model = load_model(self.args)
        except ModelsealError as exc:  # Serve shows the reason (serve status) with only this frame
            raise exc.with_traceback(None) from None
        self.load_s = time.monotonic() - started
        self.endpoint = Endpoint(self.model, self.replica)
        log.info("modelseal: replica %s serves model %s (loaded in %.2f s)", self.replica, name, self.load_s)
        self._stop = threading.Event()
        self._swap = threading.Lock()  # the retry's swap against the replica's stop
        if self.args["retry_s"] > 0 and self.model.watch is not None:  # only a watched key can be refused
            threading.Thread(target=self._retry, name="modelseal-retry", daemon=True).start()

    def _retry(self) -> None:
        """Every ``retry_s`` while the key is refused, load the model again (the agent asks the key service
        anew), so that a re-grant brings the replica back without a redeploy, as in ``modelseal serve``."""
        while not self._stop.wait(self.args["retry_s"]):
            if self.model.refusal is None:
                continue
            try:
                model = load_model(self.args)
            except ModelsealError as exc:
                log.info("modelseal: replica %s: model %s still refused: %s", self.replica, self.args["name"], exc)
                continue
            with self._swap:
                if self._stop.is_set():  # the replica is stopping: drop what was just loaded
                    model.close()
                    return
                old, self.model = self.model, model
                self.endpoint.model = model
            old.close()
            log.warning("modelseal: replica %s serves model %s again: its key is released", self.replica,
                        model.spec.name)  # fmt: skip

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP entry: a Starlette request in, a Starlette response out."""
        from starlette.responses import Response

        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root) :]
        try:
            body = await read_body(request, self.args["max_body_bytes"])
        except ModelsealError as exc:
            answer = json_answer({"error": str(exc)}, getattr(exc, "status", 400))
            answer.headers[REPLICA_HEADER] = self.replica
        else:
            header_length = request.headers.get("inference-header-content-length")
            answer = await self.endpoint.answer(request.method, path, body, header_length)
        return Response(answer.body, answer.status, headers=answer.headers, media_type=answer.content_type)

    def status(self) -> dict[str, Any]:
        """This replica's state, for a ``DeploymentHandle`` (``handle.status.remote()``): which replica and
        process, whether it serves (and why not), how long its load took, and whether it is dumpable."""
        from modelseal.memory.locked import is_dumpable

        refusal = self.model.refusal
        return {"replica": self.replica, "pid": os.getpid(), "ready": refusal is None, "reason": refusal or "",
                "load_s": self.load_s, "dumpable": is_dumpable()}  # fmt: skip

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop the watch and wipe the model."""
        stop, swap = getattr(self, "_stop", None), getattr(self, "_swap", None)
        if stop is not None and swap is not None:
            with swap:
                stop.set()
        model = getattr(self, "model", None)
        if model is not None:
            model.close()
