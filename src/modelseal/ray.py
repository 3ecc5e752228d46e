"""Serve a sealed model with Ray Serve: every replica opens it itself, with the key from its node's agent.

::

    from ray import serve
    import modelseal.ray

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(modelseal.ray.deployment("/models/resnet50/model.onnx.sealed", name="resnet50",
                                       identity="agent:/run/modelseal/agent.sock", num_replicas=2),
              route_prefix="/")
    # POST http://127.0.0.1:8000/v2/models/resnet50/infer: the KServe V2 request modelseal serve takes

Ray moves a deployment's init arguments through its controller (which keeps them in the cluster's GCS) and
puts large values in its object store, which spills to local disk. So only *where* the model and its key
come from crosses Ray: a path and an identity reference (``agent:SOCKET``, ``env:VAR`` or a key file
path; key text is refused), as strings and numbers. Each replica, in its own process, makes itself
non-dumpable, opens the sealed file the way ``modelseal serve`` does, gets the key from its node's agent,
builds serve's runtime (:class:`modelseal.triton.sealed.SealedModel`: the loader and key watch Triton and
PyTriton use), and answers V2 requests with serve's own decoding, validation and encoding
(:mod:`modelseal.serve.infer`), so statuses and messages are ``modelseal serve``'s. When the agent refuses
the key (revoked, expired), each replica's watch wipes its model within ``key_check_s`` and every request
gets 503 with the reason; every ``retry_s`` the replica tries to load it again, so a re-grant brings it
back. A replica added by ``num_replicas`` or autoscaling asks its agent, never Ray.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal.errors import MissingDependencyError, ModelsealError, UsageError, one_line
from modelseal.recipients.registry import is_identity_text

if TYPE_CHECKING:
    from ray.serve import Application

    from modelseal.triton.sealed import SealedModel

log = logging.getLogger("modelseal.ray")

MIN_KEY_CHECK_S = 0.5  # as inside Triton: 1e-300 would be a busy loop asking the agent
MAX_KEY_CHECK_S = 86400.0
MIN_RETRY_S = 1.0
MAX_GRACE_S = 3600.0  # an agent killed on the node keeps a revoked model serving at most this long
MAX_BODY_BYTES = 64 * 1024 * 1024  # modelseal serve's default
OFFLOAD_BYTES = 1 << 20  # bodies this large are decoded on a thread, as in serve's REST
REPLICA_HEADER = "Modelseal-Replica"  # which replica answered (Serve routes each request to one of them)
VERSION = "1"  # one sealed file is one version


def _seconds(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"modelseal.ray: {key} must be a number of seconds")
    if not low <= value <= high:
        raise UsageError(f"modelseal.ray: {key} must be between {low:g} and {high:g} seconds")
    return float(value)


def _strings(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"modelseal.ray: {key} must be a list of non-empty strings")
    return tuple(value)


def _retry_s(value: object) -> float:
    retry_s = _seconds("retry_s", value, 0, MAX_KEY_CHECK_S)
    if 0 < retry_s < MIN_RETRY_S:  # each retry asks the agent, and the agent may ask the key service
        raise UsageError(f"modelseal.ray: retry_s must be 0 (no retry) or at least {MIN_RETRY_S:g} s")
    return retry_s


def _identity(identity: object) -> str | None:
    """The identity *reference*: never the key itself, which would travel through Ray's controller and
    stay in the cluster's GCS with the deployment's arguments."""
    if identity is None or identity == "":
        return None
    if not isinstance(identity, str):
        raise UsageError("modelseal.ray: identity must be a string (agent:SOCKET, env:VAR or a key file path)")
    if is_identity_text(identity) or not identity.isprintable():
        raise UsageError("modelseal.ray: identity holds a key (or is not one printable line); name agent:SOCKET, "
                         "env:VAR or a key file path: Ray keeps a deployment's arguments in its GCS")  # fmt: skip
    return identity


def replica_args(
    sealed: str | os.PathLike[str],
    *,
    name: str,
    identity: str | None = None,
    platform: str = "",
    max_batch_size: int = 0,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    key_check_s: float = 5.0,
    grace_s: float = 30.0,
    retry_s: float = 30.0,
    threads: int = 0,
    trusted_signers: Sequence[str] = (),
    entry_point: str = "",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> dict[str, Any]:
    """The replica's init arguments, checked: strings, numbers and tuples of strings only (what Ray may
    carry and keep). ``sealed``: the sealed model file, directory or remote pointer file (docs/remote.md)
    at the same path on every node (made absolute here: a replica's working directory is Ray's);
    ``inputs``/``outputs``: ``NAME:DATATYPE:DIMS`` strings, for a model that does not declare them."""
    from modelseal.triton.layout import tensor_option

    if not isinstance(sealed, str | os.PathLike):
        raise UsageError("modelseal.ray: the sealed model must be a path")
    path = os.fspath(sealed)
    if "://" in path:
        raise UsageError(f"modelseal.ray: {path[:80]!r} is a URL; name a pointer file holding it "
                         "('modelseal-remote: URL', docs/remote.md) at the same path on every node")  # fmt: skip
    if not isinstance(name, str) or not name or "/" in name or len(name) > 200 or not name.isprintable():
        raise UsageError("modelseal.ray: name must be a model name (printable, no '/', at most 200 characters)")
    for key, value in (("platform", platform), ("entry_point", entry_point)):
        if not isinstance(value, str):
            raise UsageError(f"modelseal.ray: {key} must be a string")
    numbers = {"max_batch_size": (max_batch_size, 1 << 20), "threads": (threads, 1024),
               "max_body_bytes": (max_body_bytes, 1 << 40)}  # fmt: skip
    for key, (number, high) in numbers.items():
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= high:
            raise UsageError(f"modelseal.ray: {key} must be a whole number from 0 to {high}")
    check_s = _seconds("key_check_s", key_check_s, 0, MAX_KEY_CHECK_S)
    if 0 < check_s < MIN_KEY_CHECK_S:
        raise UsageError(f"modelseal.ray: key_check_s must be 0 (no key watch) or at least {MIN_KEY_CHECK_S:g} s")
    tensors = {key: _strings(key, value) for key, value in (("inputs", inputs), ("outputs", outputs))}
    for text in (*tensors["inputs"], *tensors["outputs"]):
        tensor_option(text)  # refused here, in the driver, rather than on every replica
    return {
        "sealed": os.path.abspath(path),
        "name": name,
        "identity": _identity(identity),
        "platform": platform,
        "max_batch_size": max_batch_size,
        "inputs": tensors["inputs"],
        "outputs": tensors["outputs"],
        "key_check_s": check_s,
        "grace_s": _seconds("grace_s", grace_s, 0, MAX_GRACE_S),
        "retry_s": _retry_s(retry_s),
        "threads": threads,
        "trusted_signers": _strings("trusted_signers", trusted_signers),
        "entry_point": entry_point,
        "max_body_bytes": max_body_bytes,
    }


def _check_options(options: Mapping[str, Any]) -> None:
    """Serve's deployment options pass through; a runtime_env variable holding key text is refused (Ray
    keeps the runtime_env in its GCS and hands it to every worker)."""
    if "name" in options:
        raise UsageError("modelseal.ray: the deployment is named by name=, which is also the model's name")
    actor = options.get("ray_actor_options") or {}
    runtime_env = actor.get("runtime_env") or {} if isinstance(actor, Mapping) else {}
    env = runtime_env.get("env_vars") or {} if isinstance(runtime_env, Mapping) else {}
    if isinstance(env, Mapping) and any(isinstance(v, str) and is_identity_text(v) for v in env.values()):
        raise UsageError("modelseal.ray: a runtime_env variable holds a key; set it in the node's environment "
                         "(or use agent:SOCKET): Ray keeps runtime_env in its GCS")  # fmt: skip


def deployment(
    sealed: str | os.PathLike[str], *, name: str, identity: str | None = None, **options: Any
) -> Application:
    """A Ray Serve application (``serve.run`` it) serving the sealed model ``sealed`` as ``name`` on every
    replica. Keyword arguments of :func:`replica_args` (``platform``, ``max_batch_size``, ``inputs``,
    ``outputs``, ``key_check_s``, ``grace_s``, ``retry_s``, ``threads``, ``trusted_signers``, ``entry_point``,
    ``max_body_bytes``) configure the model; every other one is a ``serve.deployment`` option
    (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``...).
    ``identity``: ``agent:SOCKET`` (the node's agent: the key watch then runs), ``env:VAR`` or a key file
    path on every node; default ``$MODELSEAL_IDENTITY``, then ``$MODELSEAL_AGENT_SOCKET`` in the replica."""
    own = set(replica_args.__kwdefaults__ or {}) - {"name", "identity"}
    args = replica_args(sealed, name=name, identity=identity, **{k: options.pop(k) for k in own & set(options)})
    _check_options(options)
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("modelseal.ray needs Ray Serve: pip install 'modelseal[ray]'") from None
    return serve.deployment(name=name, **options)(SealedReplica).bind(**args)


NUMBERS = {"max_batch_size": int, "threads": int, "max_body_bytes": int, "key_check_s": float, "grace_s": float,
           "retry_s": float}  # fmt: skip
LISTS = ("inputs", "outputs", "trusted_signers")


def build_app(args: Mapping[str, Any]) -> Application:
    """Ray Serve's *application builder*, for config files (``import_path: modelseal.ray:build_app``, the
    model's settings under ``args``, ``num_replicas`` and the like under ``deployments``, the deployment
    named as the model) and ``serve run modelseal.ray:build_app sealed=PATH name=NAME identity=...``.
    Values given as text (the command line) are converted; a list given as text is space-separated."""
    known = {"sealed", "name", "identity", *(replica_args.__kwdefaults__ or {})}
    unknown = sorted(str(k)[:40] for k in args if k not in known)
    if unknown:
        raise UsageError(f"modelseal.ray: unknown argument(s) {unknown}; known: {sorted(known)}")
    if not args.get("sealed") or not args.get("name"):
        raise UsageError("modelseal.ray: the application needs 'sealed' (the model's path) and 'name'")
    values = dict(args)
    for key, kind in NUMBERS.items():
        if isinstance(values.get(key), str):
            try:
                values[key] = kind(values[key])
            except ValueError:
                raise UsageError(f"modelseal.ray: {key} must be a number, not {values[key][:40]!r}") from None
    for key in LISTS:
        if isinstance(values.get(key), str):
            values[key] = values[key].split()
    return deployment(values.pop("sealed"), **values)


# --- the replica ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """An HTTP answer, independent of the web framework that sends it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_answer(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    import json

    return Answer(status, json.dumps(value, separators=(",", ":")).encode(), headers=headers or {})


class Endpoint:
    """The V2 routes of one loaded model, as ``modelseal serve``'s REST answers them (same statuses, same
    messages), over any HTTP front end: Ray Serve here."""

    def __init__(self, model: SealedModel, replica: str = "") -> None:
        self.model = model
        self.name = model.spec.name
        self.replica = replica

    async def answer(self, method: str, path: str, body: bytes, header_length: str | None) -> Answer:
        """The answer to ``method path`` (``path`` without Serve's route prefix); errors are JSON
        ``{"error": ...}`` with serve's status, never a traceback or tensor values."""
        from modelseal.serve.errors import ServeError

        try:
            answer = await self._route(method, path, body, header_length)
        except ServeError as exc:
            answer = json_answer({"error": str(exc)}, exc.status, {"Retry-After": "1"} if exc.status == 429 else None)
        except Exception as exc:  # a bug, not bad input: log it, tell the client only the kind
            log.exception("%s %s failed", method, path[:200])
            answer = json_answer({"error": f"internal error ({type(exc).__name__})"}, 500)
        if self.replica:
            answer.headers[REPLICA_HEADER] = self.replica
        return answer

    async def _route(self, method: str, path: str, body: bytes, header_length: str | None) -> Answer:
        from modelseal.serve import infer as v2

        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["v2"]:
            return self._no_route(method, path)
        rest = parts[1:]
        if rest in (["health", "live"], ["health", "ready"], []):
            if method != "GET":
                return self._not_allowed(method, path, "GET")
            if not rest:
                return json_answer(v2.server_metadata())
            if rest[1] == "live":
                return json_answer({"live": True})
            ready = self.model.refusal is None
            return json_answer({"ready": ready}, 200 if ready else 503)
        if rest[:1] != ["models"] or len(rest) < 2:
            return self._no_route(method, path)
        name, tail, version = rest[1], rest[2:], ""
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = tail[1], tail[2:]
        action = tail[0] if len(tail) == 1 else "" if not tail else None
        allowed = {"": "GET", "config": "GET", "ready": "GET", "infer": "POST"}
        if action not in allowed:
            return self._no_route(method, path)
        if method != allowed[action]:
            return self._not_allowed(method, path, allowed[action])
        if action == "ready":
            return self._ready(name, version)
        self._check(name, version)
        if action == "infer":
            return await self._infer(body, header_length)
        if action == "config":
            from modelseal.serve.autocomplete import effective_config

            return json_answer(effective_config(self.model.spec, self._device()))
        spec = self.model.spec
        return json_answer({
            "name": spec.name, "versions": [VERSION], "platform": spec.platform,
            "inputs": [t.metadata(spec.batching) for t in spec.inputs],
            "outputs": [t.metadata(spec.batching) for t in spec.outputs],
        })  # fmt: skip

    def _check(self, name: str, version: str) -> None:
        """As serve's ``ModelManager.get``: 404 for another model or version, 503 once the key is refused."""
        from modelseal.serve.errors import not_found, unavailable

        if name != self.name:
            raise not_found(f"unknown model {name[:200]!r}")
        if self.model.refusal is not None:
            raise unavailable(self.model.refusal)
        if version and version != VERSION:
            raise not_found(f"model {name} has no ready version {version[:40]!r} (ready: {VERSION})")

    def _ready(self, name: str, version: str) -> Answer:
        from modelseal.serve.errors import ServeError

        try:
            self._check(name, version)
        except ServeError as exc:
            return json_answer({"ready": False, "reason": str(exc)}, 400 if exc.status != 404 else 404)
        return json_answer({"ready": True})

    def _device(self) -> str:
        runtime = self.model.runtime
        return str(getattr(runtime, "device", "cpu")) if runtime is not None else "cpu"

    async def _infer(self, body: bytes, header_length: str | None) -> Answer:
        from modelseal.serve.errors import ServeError, unavailable
        from modelseal.serve.infer import HEADER_LENGTH, decode_rest, runtime_refusal, validate

        if len(body) >= OFFLOAD_BYTES:
            decoded = await asyncio.to_thread(decode_rest, body, header_length)
        else:
            decoded = decode_rest(body, header_length)
        spec = self.model.spec
        wanted = validate(spec, decoded.inputs, decoded.outputs)
        try:
            results = await asyncio.to_thread(self.model.run, decoded.inputs, wanted)
        except ServeError:
            raise
        except Exception as exc:  # as serve's ModelManager.infer: the kind, never tensor contents
            if self.model.refusal is not None:  # the key was refused while the request waited
                raise unavailable(self.model.refusal) from None
            refused = runtime_refusal(exc)
            if refused is not None:
                raise refused from None
            log.error("inference on %s failed: %s", spec.name, type(exc).__name__)
            why = str(exc) if isinstance(exc, ModelsealError) else type(exc).__name__  # ours never hold data
            raise ServeError(500, f"inference on {spec.name} failed: {why}") from None

        def encode() -> tuple[bytes, list[bytes]]:
            return decoded.respond(self.name, VERSION, results, spec).rest()

        json_part, chunks = await asyncio.to_thread(encode) if decoded.classification else encode()
        if not chunks:
            return Answer(200, json_part)
        return Answer(200, json_part + b"".join(chunks), "application/octet-stream",
                      {HEADER_LENGTH: str(len(json_part))})  # fmt: skip

    @staticmethod
    def _no_route(method: str, path: str) -> Answer:
        return json_answer({"error": f"{method} {path[:200]}: no such route"}, 404)

    @staticmethod
    def _not_allowed(method: str, path: str, allow: str) -> Answer:
        return json_answer({"error": f"{method} {path[:200]}: method not allowed"}, 405, {"Allow": allow})


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
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (serve's 413 messages): a declared length is checked before
    a byte is read, a chunked body as it arrives."""
    from modelseal.serve.errors import ServeError

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body too large ({int(declared)} bytes; limit {limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
