"""The key service's HTTP API on aiohttp (chosen because it exposes the TLS client certificate).

Host endpoints (mTLS required): ``POST /v1/challenge``, ``POST /v1/release``, ``GET /v1/keys``.
Admin endpoints (bearer token): ``/v1/admin/...``. Public: ``GET /v1/health``, ``/v1/ready``, ``/v1/info``,
``GET /openapi.json``. Every error is a JSON body ``{"error": {"code", "message"}}`` with a 4xx
status; refusals are audited (past a burst, counted: :mod:`modelseal.keyserver.refusals`). Request
bodies are strict JSON objects with bounded size and depth (:func:`modelseal.jsonlimits.loads_bounded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from modelseal.encoding import b64d
from modelseal.errors import FormatError, ModelsealError
from modelseal.jsonlimits import JSONLimitError, loads_bounded
from modelseal.keyserver.config import token_hash
from modelseal.keyserver.openapi import openapi_document
from modelseal.keyserver.service import KeyService, Refused
from modelseal.pki import PeerIdentity, peer_identity
from modelseal.release.protocol import MODEL_NAME, Route, service_public_key_text
from modelseal.release.terms import period_seconds
from modelseal.release.usage import ID

log = logging.getLogger("modelseal.keyserver")
SERVICE: web.AppKey[KeyService] = web.AppKey("service", KeyService)
TOKEN_HASH: web.AppKey[str] = web.AppKey("token_hash", str)
MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_JSON_DEPTH = 32  # the deepest real body (a release with TEE evidence) nests 5 levels


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _actor(request: web.Request) -> dict[str, Any]:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {"remote": peer[0] if peer else "unknown", "path": request.path}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to a JSON error; audit refusals on host and admin endpoints."""
    started = time.perf_counter()
    service = request.app[SERVICE]
    try:
        response = await handler(request)
    except Refused as refusal:
        response = error_response(refusal.status, refusal.code, str(refusal))
    except web.HTTPException as exc:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else f"request body exceeds {request.app[MAX_BODY]} bytes"
        if exc.status == 413 or request.path.startswith((Route.RELEASE, Route.CHALLENGE, Route.ADMIN)):
            service.audit_refusal({"event": "request", **_actor(request)}, exc.status, code, message)
        response = error_response(exc.status, code, message)
    except ModelsealError as exc:  # a configuration or backend problem: the caller cannot fix it
        log.error("request %s %s failed: %s", request.method, request.path, exc)
        response = error_response(503, "unavailable", "the key service cannot complete this request now")
    log.info(
        "%s %s -> %d in %.1f ms", request.method, request.path, response.status, (time.perf_counter() - started) * 1e3
    )
    return response


# --- request parsing -------------------------------------------------------------------------------


async def _body(request: web.Request, event: str) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = loads_bounded(raw, max_bytes=request.app[MAX_BODY], max_depth=MAX_JSON_DEPTH, what="the request body")
    except JSONLimitError as exc:
        status, code = {"too_large": (413, "too_large"), "too_deep": (400, "json_too_deep")}.get(
            exc.code, (400, "malformed_json")
        )
        raise _refuse(request, event, status, code, str(exc)) from None
    if not isinstance(data, dict):
        raise _refuse(request, event, 400, "malformed_json", "the request body must be a JSON object")
    return data


def _refuse(request: web.Request, event: str, status: int, code: str, message: str, **extra: Any) -> Refused:
    return request.app[SERVICE].audit_refusal({"event": event, **_actor(request), **extra}, status, code, message)


class Fields:
    """Typed access to a JSON object's fields; a bad field is an audited 400."""

    def __init__(self, request: web.Request, event: str, data: dict[str, Any]) -> None:
        self.request, self.event, self.data = request, event, data

    def bad(self, message: str) -> Refused:
        return _refuse(self.request, self.event, 400, "bad_request", message)

    def text(self, name: str, max_len: int = 200) -> str:
        value = self.data.get(name)
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise self.bad(f"field {name!r} must be a non-empty string of at most {max_len} characters")
        return value

    def optional_text(self, name: str, max_len: int) -> str | None:
        return None if self.data.get(name) is None else self.text(name, max_len)

    def integer(self, name: str, lo: int = 0, hi: int = 2**53) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.bad(f"field {name!r} must be an integer from {lo} to {hi}")
        return value

    def objects(self, name: str, max_items: int = 8) -> list[dict[str, Any]]:
        value = self.data.get(name, [])
        if (
            not isinstance(value, list)
            or len(value) > max_items
            or not all(isinstance(v, dict) and isinstance(v.get("kind"), str) for v in value)
        ):
            raise self.bad(f"field {name!r} must be a list of at most {max_items} objects with a 'kind'")
        return value


def _peer(request: web.Request, event: str) -> PeerIdentity:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    if not der:
        raise _refuse(
            request, event, 401, "no_client_cert", "this endpoint needs a client certificate issued by the service's CA"
        )
    peer = peer_identity(der)
    if peer.refused_uris:  # e.g. a URI SAN spelled "spki:<someone else's key hash>": serve it nothing
        raise _refuse(
            request, event, 403, "bad_identity",
            f"the client certificate {peer.spki} ({peer.subject}) is refused: {peer.refused_uris[0]}; "
            "reissue it without that URI SAN",
            host=peer.spki,
        )  # fmt: skip
    return peer


def _admin(request: web.Request) -> dict[str, Any]:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    expected = request.app[TOKEN_HASH]
    if not token or not expected or not hmac.compare_digest(token_hash(token), expected):
        raise _refuse(request, "admin.auth", 401, "unauthorised", "admin endpoints need a valid bearer token")
    return {**_actor(request), "actor": "admin"}


# --- host endpoints --------------------------------------------------------------------------------


async def challenge(request: web.Request) -> web.Response:
    peer = _peer(request, "challenge")
    fields = Fields(request, "challenge", await _body(request, "challenge"))
    key_id, usage_log = fields.text("key_id", 64), fields.optional_text("usage_log", 64)
    result = request.app[SERVICE].challenge(peer, key_id, _actor(request), usage_log)
    return web.json_response(result)


async def release(request: web.Request) -> web.Response:
    peer = _peer(request, "release")
    fields = Fields(request, "release", await _body(request, "release"))
    key_id, nonce = fields.text("key_id", 64), fields.text("nonce", 64)
    evidence = fields.objects("evidence")
    try:
        ephemeral = b64d(fields.data.get("ephemeral_key"), what="ephemeral_key", length=32)
    except FormatError as exc:
        raise fields.bad(str(exc)) from None
    usage = fields.data.get("usage")  # the agent's usage report: checked by the service (keyserver/usage.py)
    result = request.app[SERVICE].release(peer, key_id, nonce, ephemeral, evidence, _actor(request), usage)
    return web.json_response(result)


async def my_keys(request: web.Request) -> web.Response:
    peer = _peer(request, "keys")
    return web.json_response({"host": peer.spki, "keys": request.app[SERVICE].granted_keys(peer)})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when the database answers (a read of the audit head, off the event loop, within 3 s): a
    replica that lost its database stops receiving traffic, while ``/v1/health`` keeps it alive."""
    try:
        head = await asyncio.wait_for(asyncio.to_thread(request.app[SERVICE].store.audit_head), 3)
    except TimeoutError:
        head = None
    if head is None:
        return web.json_response(
            {"error": {"code": "not_ready", "message": "the key-service database cannot be read"}}, status=503
        )
    return web.json_response({"status": "ready"})


async def info(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {"lease_public_key": service_public_key_text(service.signer), "evidence_kinds": service.evidence_kinds}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# --- admin endpoints -------------------------------------------------------------------------------


async def add_model(request: web.Request) -> web.Response:
    actor = _admin(request)
    fields = Fields(request, "model.add", await _body(request, "model.add"))
    name = fields.text("model")
    description = fields.optional_text("description", 2000) or ""
    return web.json_response(request.app[SERVICE].add_model(name, description, actor), status=201)


async def list_models(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response({"models": request.app[SERVICE].list_models()})


async def register_key(request: web.Request) -> web.Response:
    actor = _admin(request)
    fields = Fields(request, "key.register", await _body(request, "key.register"))
    model = fields.text("model")
    try:
        dek = b64d(fields.data.get("key"), what="key", length=32)
    except FormatError as exc:
        raise fields.bad(str(exc)) from None
    return web.json_response(request.app[SERVICE].register_key(model, dek, actor), status=201)


async def add_grant(request: web.Request) -> web.Response:
    actor = _admin(request)
    fields = Fields(request, "grant.add", await _body(request, "grant.add"))
    model = fields.text("model")
    identity = fields.text("identity", 500)
    spec = {
        "identity": identity,
        "not_before": fields.integer("not_before"),
        "not_after": fields.integer("not_after"),
        "max_hosts": fields.integer("max_hosts", 1, 1_000_000),
        "max_releases": fields.integer("max_releases", 1, 2**31 - 1),
        "grace_s": fields.integer("grace_s", 0, 30 * 86400),
        "policy": fields.optional_text("policy", 4096),
        "evidence": fields.objects("evidence"),
        "terms": fields.data.get("terms"),  # licence terms: checked by the service (release/terms.py)
    }
    if spec["grace_s"] is None:
        del spec["grace_s"]
    return web.json_response(request.app[SERVICE].add_grant(model, spec, actor), status=201)


async def list_grants(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response({"grants": request.app[SERVICE].list_grants(request.query.get("model"))})


async def revoke_grant(request: web.Request) -> web.Response:
    actor = _admin(request)
    fields = Fields(request, "grant.revoke", await _body(request, "grant.revoke"))
    reason = fields.optional_text("reason", 500) or "revoked by the model owner"
    return web.json_response(request.app[SERVICE].revoke_grant(request.match_info["grant_id"], reason, actor))


async def rotate_master_key(request: web.Request) -> web.Response:
    actor = _admin(request)
    return web.json_response(request.app[SERVICE].rotate_master_key(actor))


async def audit_log(request: web.Request) -> web.Response:
    _admin(request)
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise _refuse(request, "audit.read", 400, "bad_request", "after and limit must be integers") from None
    if not 0 <= after < 2**63 or not 1 <= limit <= 10000:
        raise _refuse(request, "audit.read", 400, "bad_request", "after must be 0 to 2**63-1 and limit 1 to 10000")
    return web.json_response({"entries": request.app[SERVICE].audit_log(after, limit)})


async def usage_report(request: web.Request) -> web.Response:
    """``?since=&until=`` (Unix seconds; default: the last 31 days), ``period=`` (hour, day, week or seconds;
    default day), ``grant=``, ``model=``: usage per licence per period."""
    _admin(request)
    query = request.query
    try:
        until = int(query.get("until", time.time()))
        since = int(query.get("since", until - 31 * 86400))
        period_s = period_seconds(query.get("period", "day"))
    except (ValueError, FormatError) as exc:
        raise _refuse(request, "usage.read", 400, "bad_request", f"bad usage query: {exc}") from None
    if not 0 <= since <= until < 2**53:
        raise _refuse(request, "usage.read", 400, "bad_request", "since and until must be Unix times, since <= until")
    grant, model = query.get("grant"), query.get("model")
    if (grant is not None and not ID.fullmatch(grant)) or (model is not None and not MODEL_NAME.fullmatch(model)):
        raise _refuse(request, "usage.read", 400, "bad_request", "grant must be a grant id and model a model name")
    rows = request.app[SERVICE].usage_report(since, until, period_s, grant, model)
    return web.json_response({"since": since, "until": until, "period_s": period_s, "usage": rows})


async def reset_usage(request: web.Request) -> web.Response:
    actor = _admin(request)
    fields = Fields(request, "usage.reset", await _body(request, "usage.reset"))
    host, log = fields.text("host", 100), fields.optional_text("log", 64)
    reason = fields.optional_text("reason", 500) or "reset by the model owner"
    return web.json_response(request.app[SERVICE].reset_usage(host, log, reason, actor))


async def refusal_summaries(app: web.Application) -> AsyncIterator[None]:
    """Write the refusal counts every interval, and once more at shutdown."""
    service = app[SERVICE]

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(service.refusals.settings.interval_s)
            try:
                service.flush_refusals()
            except Exception:  # the database is down: the counts are kept for the next try
                log.exception("could not write refusal counts to the audit log; retrying next interval")

    task = asyncio.create_task(every_interval())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    service.flush_refusals()


def build_app(service: KeyService, admin_token_sha256: str, max_body_bytes: int = 64 * 1024) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body_bytes)
    app.cleanup_ctx.append(refusal_summaries)
    app[SERVICE] = service
    app[TOKEN_HASH] = admin_token_sha256
    app[MAX_BODY] = max_body_bytes
    app.add_routes(
        [
            web.get(Route.HEALTH, health),
            web.get(Route.READY, ready),
            web.get(Route.INFO, info),
            web.get("/openapi.json", openapi),
            web.post(Route.CHALLENGE, challenge),
            web.post(Route.RELEASE, release),
            web.get(Route.KEYS, my_keys),
            web.post(Route.MODELS, add_model),
            web.get(Route.MODELS, list_models),
            web.post(Route.ADMIN_KEYS, register_key),
            web.post(Route.GRANTS, add_grant),
            web.get(Route.GRANTS, list_grants),
            web.post(Route.REVOKE, revoke_grant),
            web.post(Route.ROTATE_MASTER_KEY, rotate_master_key),
            web.get(Route.AUDIT, audit_log),
            web.get(Route.USAGE, usage_report),
            web.post(Route.USAGE_RESET, reset_usage),
        ]
    )
    return app
