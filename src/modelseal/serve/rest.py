"""The Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's binary tensor data extension.

Served by aiohttp rather than FastAPI/uvicorn: the server must know *which client certificate* made each
request (for the per-request audit record), and uvicorn does not expose the peer certificate to the
application (FIELD-NOTES); aiohttp does. HTTP parsing is aiohttp's; this module only maps the protocol.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from modelseal.pki import peer_identity
from modelseal.serve import datatypes
from modelseal.serve.errors import ServeError, bad_request
from modelseal.serve.models import ModelManager

HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER: web.AppKey[Any] = web.AppKey("server")
EXTENSIONS = ["binary_tensor_data", "model_repository", "metrics"]


def client_identity(request: web.Request) -> str:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return peer_identity(der).spki if der else "anonymous"


def error_response(exc: ServeError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=exc.status)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    try:
        return await handler(request)
    except ServeError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVER].config.max_body_bytes
        return web.json_response({"error": f"request body too large (limit {limit} bytes)"}, status=413)


# --- decoding ------------------------------------------------------------------------------------


def parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= n <= len(body):
            raise bad_request(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        json_part, binary = body[:n], body[n:]
    try:
        request = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise bad_request("the request must be a JSON object")
    return request, binary


def decode_inputs(request: dict[str, Any], binary: bytes) -> dict[str, np.ndarray]:
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad_request("the request needs a non-empty 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each input needs a 'name'")
        name = item["name"]
        shape, dtype_name = item.get("shape"), item.get("datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad_request(f"input {name}: 'shape' must be a list of non-negative integers")
        if not isinstance(dtype_name, str):
            raise bad_request(f"input {name}: 'datatype' is missing")
        try:
            dtype = datatypes.numpy_dtype(dtype_name)
        except Exception as exc:
            raise bad_request(f"input {name}: {exc}") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        size = (item.get("parameters") or {}).get("binary_data_size")
        try:
            if size is not None:
                if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
                    raise bad_request(f"input {name}: binary_data_size {size} does not match shape and datatype")
                array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
                offset += size
            else:
                data = item.get("data")
                if data is None:
                    raise bad_request(f"input {name} has neither 'data' nor binary data")
                array = np.asarray(data, dtype=dtype)
                if array.size != count:
                    raise bad_request(f"input {name}: {array.size} values do not fill shape {shape}")
                array = array.reshape(shape)
        except (ValueError, TypeError) as exc:
            raise bad_request(f"input {name}: {exc}") from None
        if name in arrays:
            raise bad_request(f"input {name} is given twice")
        arrays[name] = array
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def requested_outputs(request: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    """Output names and, per output, whether it goes back as binary data."""
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    names, binary = [], {}
    for item in request.get("outputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each requested output needs a 'name'")
        names.append(item["name"])
        binary[item["name"]] = bool((item.get("parameters") or {}).get("binary_data", default_binary))
    return names, {"*": default_binary, **binary}


def encode_response(model: str, version: str, request_id: Any, results: dict[str, np.ndarray],
                    binary: dict[str, bool]) -> web.Response:  # fmt: skip
    outputs, chunks = [], []
    for name, array in results.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatypes.v2_name(array.dtype), "shape": list(array.shape)}
        if binary.get(name, binary["*"]):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=header + b"".join(chunks),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


# --- handlers ------------------------------------------------------------------------------------


def server(request: web.Request) -> Any:
    return request.app[SERVER]


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = server(request).ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    from modelseal import __version__

    return web.json_response({"name": "modelseal", "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    models: ModelManager = server(request).models
    model = models.get(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(models.metadata(model))


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
    try:
        body, binary = parse_body(await request.read(), request.headers.get(HEADER_LENGTH))
        model = srv.models.get(name, version)
        served_version = str(model.version)
        inputs = decode_inputs(body, binary)
        outputs, binary_out = requested_outputs(body)
        results = await srv.models.infer(model, inputs, outputs)
        status = "ok"
        return encode_response(name, served_version, body.get("id"), results, binary_out)
    except ServeError as exc:
        status = exc.grpc_code.lower()
        raise
    finally:
        seconds = time.monotonic() - started
        srv.metrics.observe_request(name, served_version, "http", status, seconds)
        srv.audit.record("http", name, served_version, client_identity(request), status, seconds)


async def repository_index(request: web.Request) -> web.Response:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise bad_request("the request is not valid JSON") from None
    ready_only = bool(body.get("ready", False)) if isinstance(body, dict) else False
    return web.json_response(server(request).models.index(ready_only))


async def repository_load(request: web.Request) -> web.Response:
    srv = server(request)
    name = request.match_info["model"]
    await srv.models.load(name)
    srv.audit.record("http", name, "", client_identity(request), "load", 0.0)
    return web.json_response({})


async def repository_unload(request: web.Request) -> web.Response:
    srv = server(request)
    name = request.match_info["model"]
    srv.models.get(name)  # 404 / 503 for unknown or not loaded
    await srv.models.unload(name, "unloaded through the repository API")
    srv.audit.record("http", name, "", client_identity(request), "unload", 0.0)
    return web.json_response({})


async def metrics(request: web.Request) -> web.Response:
    data, content_type = server(request).metrics.render()
    return web.Response(body=data, headers={"Content-Type": content_type})


def build_app(srv: Any, max_body_bytes: int) -> web.Application:
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
        web.get(f"{model}/ready", model_ready),
        web.get(f"{versioned}/ready", model_ready),
        web.post(f"{model}/infer", infer),
        web.post(f"{versioned}/infer", infer),
        web.post("/v2/repository/index", repository_index),
        web.post("/v2/repository/models/{model}/load", repository_load),
        web.post("/v2/repository/models/{model}/unload", repository_unload),
        web.get("/metrics", metrics),
    ])  # fmt: skip
    return app
