"""The Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's binary tensor data extension.

Served by aiohttp rather than FastAPI/uvicorn: the server must know *which client certificate* made each
request (for the per-request audit record), and uvicorn does not expose the peer certificate to the
application (FIELD-NOTES); aiohttp does. HTTP parsing is aiohttp's; this module only maps the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import ContentEncodingError

from modelseal.pki import peer_identity
from modelseal.serve import infer as v2
from modelseal.serve.errors import ServeError
from modelseal.serve.infer import HEADER_LENGTH, decode_rest, parse_json
from modelseal.serve.metering import rate_client
from modelseal.serve.models import ModelManager

log = logging.getLogger("modelseal.serve")
SERVER: web.AppKey[Any] = web.AppKey("server")


def client_identity(request: web.Request) -> str:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return peer_identity(der).spki if der else "anonymous"


def error_response(exc: ServeError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after or 1)} if exc.status == 429 else None
    return web.json_response({"error": str(exc)}, status=exc.status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    try:
        return await handler(request)
    except ServeError as exc:
        response = error_response(exc)
        if request.content.exception() is not None:  # e.g. a body that did not decode: the parser is
            response.force_close()  # mid-message, so a next request on this connection would never be read
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVER].config.max_body_bytes
        return web.json_response({"error": f"request body too large (limit {limit} bytes)"}, status=413)
    except web.HTTPException as exc:  # aiohttp's own answers (no such route, method not allowed): JSON too
        if exc.status < 400:
            raise
        what = f"{request.method} {request.path[:200]}"
        reason = "no such route" if exc.status == 404 else exc.reason.lower()
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": f"{what}: {reason}"}, status=exc.status, headers=allow)
    except Exception as exc:  # a bug, not bad input: log it, tell the client only the kind
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error ({type(exc).__name__})"}, status=500)


# --- bodies ----------------------------------------------------------------------------------------

OFFLOAD_BYTES = 1 << 20  # bodies this large are decoded on a thread, so the event loop keeps answering


def encoded(request: web.Request) -> bool:
    """Whether the body comes with a Content-Encoding (gzip, deflate, br) that aiohttp decodes as it reads."""
    return request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")


@contextlib.asynccontextmanager
async def body_within_budget(request: web.Request) -> AsyncIterator[bytes]:
    """The request body, charged to the server's in-flight byte budget for as long as it is used.

    A declared ``Content-Length`` is checked against the size limit and charged *before* a byte is read,
    so refused bodies are never buffered (a compressed one is charged the size limit, as what it decodes
    to is unknown, and aiohttp refuses it with 413 past the limit); a chunked body is charged as its
    decoded chunks arrive. The whole body must arrive within ``--body-timeout`` seconds, so slow senders
    cannot keep the budget."""
    srv = server(request)
    limit, budget = srv.config.max_body_bytes, srv.budget
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ServeError(413, f"request body too large ({declared} bytes; limit {limit} bytes)")
    charged = 0
    try:
        try:
            async with asyncio.timeout(srv.config.body_timeout_s):  # a trickled body cannot hold the budget
                if declared is not None:
                    # a compressed body's decoded size is unknown until it is decoded (58 KB of gzip is
                    # 60 MB of JSON): charge the most it may decode to, then only what it did
                    need = limit if encoded(request) else declared
                    budget.take(need)
                    charged = need  # only once taken: the finally releases what was charged
                    body = await request.read()
                    budget.release(charged - min(charged, len(body)))
                    charged = min(charged, len(body))
                else:
                    chunks = []
                    async for chunk in request.content.iter_chunked(1 << 16):
                        if charged + len(chunk) > limit:
                            raise ServeError(413, f"request body too large (limit {limit} bytes)")
                        budget.take(len(chunk))
                        charged += len(chunk)
                        chunks.append(chunk)
                    body = b"".join(chunks)
        except TimeoutError:
            raise ServeError(408, f"the request body did not arrive within {srv.config.body_timeout_s:g} s") from None
        except (ConnectionError, ClientPayloadError):  # the client went away: nobody to answer, nothing to log
            raise ServeError(400, "the client closed the connection before sending its whole body") from None
        except web.RequestPayloadError as exc:  # aiohttp could not decode the Content-Encoding
            if not isinstance(exc.__cause__, ContentEncodingError):
                raise ServeError(400, "the request body could not be read (malformed framing)") from None
            encoding = request.headers.get("Content-Encoding", "encoded")
            # the payload is dead: end it here, or aiohttp drains it after the answer and logs a traceback
            request.content.feed_eof()
            raise ServeError(400, f"the request body is not valid {encoding[:20]} data") from None
        yield body
    finally:
        budget.release(charged)


# --- handlers ------------------------------------------------------------------------------------


def server(request: web.Request) -> Any:
    return request.app[SERVER]


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = server(request).ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(v2.server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    models: ModelManager = server(request).models
    model = models.get(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(models.metadata(model))


async def model_config(request: web.Request) -> web.Response:
    models: ModelManager = server(request).models
    model = models.get(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(models.config(model))


async def model_statistics(request: web.Request) -> web.Response:
    models: ModelManager = server(request).models
    stats = models.statistics(request.match_info.get("model", ""), request.match_info.get("version", ""))
    return web.json_response({"model_stats": stats})


async def model_ready(request: web.Request) -> web.Response:
    try:
        server(request).models.get(request.match_info["model"], request.match_info.get("version", ""))
    except ServeError as exc:
        return web.json_response({"ready": False, "reason": str(exc)}, status=400 if exc.status != 404 else 404)
    return web.json_response({"ready": True})


async def infer(request: web.Request) -> web.Response:
    srv = server(request)
    name, version = request.match_info["model"], request.match_info.get("version", "")
    started = time.monotonic()
    status, served_version = "error", version  # e.g. a body over the size limit
    client = client_identity(request)
    try:
        async with body_within_budget(request) as body:
            model = srv.models.get(name, version)
            served_version = str(model.version)
            header = request.headers.get(HEADER_LENGTH)
            if len(body) >= OFFLOAD_BYTES:
                decoded = await asyncio.to_thread(decode_rest, body, header)
            else:
                decoded = decode_rest(body, header)
            results = await srv.models.infer(model, decoded.inputs, decoded.outputs,
                                           client=rate_client(client, request.remote))
        def encode() -> tuple[bytes, list[bytes]]:
            return decoded.respond(name, served_version, results, model.spec, model.labels).rest()

        # sorting and formatting classes happens off the event loop, as large decodes do
        json_part, chunks = await asyncio.to_thread(encode) if decoded.classification else encode()
        status = "ok"
        if not chunks:
            return web.Response(body=json_part, content_type="application/json")
        return web.Response(body=json_part + b"".join(chunks), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(json_part))})  # fmt: skip
    except ServeError as exc:
        status = exc.grpc_code.lower()
        raise
    finally:
        seconds = time.monotonic() - started
        srv.metrics.observe_request(name, served_version, "http", status, seconds)
        srv.audit.record("http", name, served_version, client, status, seconds)


async def repository_index(request: web.Request) -> web.Response:
    async with body_within_budget(request) as raw:
        body = parse_json(raw) if raw.strip() else {}
    ready_only = body.get("ready", False) if isinstance(body, dict) else None
    if not isinstance(ready_only, bool):
        raise ServeError(400, 'the index request must be a JSON object whose "ready" is true or false')
    return web.json_response(server(request).models.index(ready_only))


def load_config_override(parameters: Any) -> str | None:
    """The ``config`` of a repository load request's parameters (a JSON string, as tritonclient sends
    it), None without one; model files sent with the request (``file:...``) are refused: a served model's
    files come from the repository, sealed."""
    if not isinstance(parameters, dict):
        raise ServeError(400, "the load request's 'parameters' must be a JSON object")
    if any(isinstance(key, str) and key.startswith("file:") for key in parameters):
        raise ServeError(400, "model files cannot be sent with a load request: put them, sealed, in the repository")
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise ServeError(400, "the load request's 'config' parameter must be a string holding a JSON model config")
    return config


async def repository_load(request: web.Request) -> web.Response:
    srv = server(request)
    name = request.match_info["model"]
    async with body_within_budget(request) as raw:
        body = parse_json(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ServeError(400, "the load request must be a JSON object")
    await srv.models.load(name, load_config_override(body.get("parameters", {})))
    srv.audit.record("http", name, "", client_identity(request), "load", 0.0)
    return web.json_response({})


async def repository_unload(request: web.Request) -> web.Response:
    srv = server(request)
    name = request.match_info["model"]
    if name not in srv.models.models and name not in srv.models.repository.names():
        raise ServeError(404, f"unknown model {name[:200]!r}")
    await srv.models.unload(name, "unloaded through the repository API")  # not loaded: a success, as in Triton
    srv.audit.record("http", name, "", client_identity(request), "unload", 0.0)
    return web.json_response({})


async def metrics(request: web.Request) -> web.Response:
    data, content_type = server(request).metrics.render()
    return web.Response(body=data, headers={"Content-Type": content_type})


def build_app(srv: Any, max_body_bytes: int) -> web.Application:
    from modelseal.serve.tfserving.rest import routes as tfserving_routes

    app = web.Application(middlewares=[errors], client_max_size=max_body_bytes)
    app[SERVER] = srv
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", server_metadata),
        web.get(model, model_metadata),
        web.get(versioned, model_metadata),
        web.get(f"{model}/config", model_config),
        web.get(f"{versioned}/config", model_config),
        web.get("/v2/models/stats", model_statistics),
        web.get(f"{model}/stats", model_statistics),
        web.get(f"{versioned}/stats", model_statistics),
        web.get(f"{model}/ready", model_ready),
        web.get(f"{versioned}/ready", model_ready),
        web.post(f"{model}/infer", infer),
        web.post(f"{versioned}/infer", infer),
        web.post("/v2/repository/index", repository_index),
        web.post("/v2/repository/models/{model}/load", repository_load),
        web.post("/v2/repository/models/{model}/unload", repository_unload),
        web.get("/metrics", metrics),
        *tfserving_routes(),  # TF Serving's REST API (/v1/models/...)
    ])  # fmt: skip
    return app
