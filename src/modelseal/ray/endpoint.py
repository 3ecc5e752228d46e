"""The V2 REST routes of one loaded sealed model, answered as ``modelseal serve``'s REST answers them (its
decoding, validation and encoding from :mod:`modelseal.serve.infer`, its statuses and messages), over any
HTTP front end: a Ray Serve replica here."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelseal.errors import ModelsealError

if TYPE_CHECKING:
    from modelseal.triton.sealed import SealedModel

log = logging.getLogger("modelseal.ray")

OFFLOAD_BYTES = 1 << 20  # bodies this large are decoded on a thread, as in serve's REST
REPLICA_HEADER = "Modelseal-Replica"  # which replica answered (Serve routes each request to one of them)
VERSION = "1"  # one sealed file is one version


@dataclass
class Answer:
    """An HTTP answer, independent of the web framework that sends it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_answer(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
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
