"""TF Serving's REST API on ``modelseal serve``'s HTTP port, beside the Open Inference Protocol:

- ``POST /v1/models/{m}[/versions/{v}]:predict``: the row format (``instances``, answered with
  ``predictions``) or the columnar one (``inputs``, answered with ``outputs``), ``signature_name`` optional;
- ``GET /v1/models/{m}[/versions/{v}]``: the model's status;
- ``GET /v1/models/{m}[/versions/{v}]/metadata``: its signature.

Bodies go through the same size limit, in-flight budget and body timeout as the V2 routes, and errors are
TF Serving's ``{"error": "..."}`` with the HTTP status TF Serving gives their code. ``:classify`` and
``:regress`` are answered 501: modelseal serves models' own signatures, not TensorFlow's Example protos.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from aiohttp import web

from modelseal.serve.errors import ServeError
from modelseal.serve.infer import parse_json
from modelseal.serve.metering import rate_client
from modelseal.serve.models import LoadedModel
from modelseal.serve.rest import OFFLOAD_BYTES, body_within_budget, client_identity, server
from modelseal.serve.tfserving import api
from modelseal.serve.tfserving.tensors import from_json, is_b64, to_json

PROTOCOL = "tfserving-http"  # in metrics and audit records
MODEL = "/v1/models/{model:[^/:]+}"
VERSIONED = MODEL + "/versions/{version:[0-9]+}"


def bad(message: str) -> api.TFServingError:
    return api.TFServingError("INVALID_ARGUMENT", message)


def _version(request: web.Request) -> int | None:
    text = request.match_info.get("version")
    return None if text is None else api.parse_version(text)


def _named(model: LoadedModel, value: Any, what: str) -> dict[str, Any]:
    """``{input name: value}`` from a row's or the columns' value: an object naming the inputs, or (for a
    model with one input) the value itself."""
    names = [t.name for t in model.spec.inputs]
    if isinstance(value, dict) and not is_b64(value):
        return value
    if len(names) != 1:
        raise bad(f"{what} must be a JSON object naming the inputs {names}: the signature has {len(names)}")
    return {names[0]: value}


def decode(model: LoadedModel, body: dict[str, Any], limit: int) -> tuple[dict[str, np.ndarray], bool]:
    """(the input tensors, whether the request is in the row format)."""
    if ("instances" in body) == ("inputs" in body):
        raise bad("the request must hold exactly one of 'instances' (row format) and 'inputs' (columnar format)")
    datatypes = {t.name: t.datatype for t in model.spec.inputs}
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise bad("'instances' must be a non-empty list")
        spec = model.spec
        if spec.batching and len(rows) > spec.max_batch_size:  # before a row is looked at
            raise bad(f"{len(rows)} instances are more than model {spec.name}'s max_batch_size {spec.max_batch_size}")
        if len(datatypes) == 1 and not any(isinstance(row, dict) and not is_b64(row) for row in rows):
            columns = {next(iter(datatypes)): rows}  # one input: the rows are its values, as they are
        else:
            named = [_named(model, row, "each instance") for row in rows]
            keys = set(named[0])
            if any(set(row) != keys for row in named):
                raise bad("every instance must name the same inputs")
            columns = {key: [row[key] for row in named] for key in keys}
    else:
        columns = _named(model, body["inputs"], "'inputs'")
    api.check_input_names(model, list(columns))
    return {n: from_json(n, v, datatypes[n], limit) for n, v in columns.items()}, "instances" in body


def encode(results: dict[str, np.ndarray], rows: bool) -> bytes:
    """``{"predictions": [...]}`` (one entry per row: the output's row, or an object of each output's)
    or ``{"outputs": ...}``, with non-finite floats written bare as TF Serving writes them."""
    values = {name: to_json(name, array) for name, array in results.items()}
    if rows:
        sizes = {name: array.shape[0] if array.ndim else None for name, array in results.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise bad(f"the outputs' batch sizes differ ({sizes}); ask for the columnar format ('inputs')")
        if len(values) == 1:
            body: dict[str, Any] = {"predictions": next(iter(values.values()))}
        else:
            count = next(iter(sizes.values())) or 0
            body = {"predictions": [{name: v[i] for name, v in values.items()} for i in range(count)]}
    else:
        body = {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    return json.dumps(body, separators=(",", ":")).encode()


async def predict(request: web.Request) -> web.Response:
    srv = server(request)
    name = request.match_info["model"]
    started = time.monotonic()
    status, version = "error", request.match_info.get("version", "")
    client = client_identity(request)
    try:
        async with body_within_budget(request) as raw:
            model = api.lookup(srv, name, _version(request))
            version = str(model.version)
            body = parse_json(raw)
            if not isinstance(body, dict):
                raise bad("the request must be a JSON object")
            signature = body.get("signature_name", "")
            if not isinstance(signature, str):
                raise bad("'signature_name' must be a string")
            api.check_signature(model, signature)
            limit = srv.config.max_body_bytes
            if len(raw) >= OFFLOAD_BYTES:
                inputs, rows = await asyncio.to_thread(decode, model, body, limit)
            else:
                inputs, rows = decode(model, body, limit)
            del body
            outputs = api.check_outputs(model, [])
            results = await api.predict(srv, model, inputs, outputs, rate_client(client, request.remote))
        answer = await asyncio.to_thread(encode, results, rows) if len(raw) >= OFFLOAD_BYTES else encode(results, rows)
        status = "ok"
        return web.Response(body=answer, content_type="application/json")
    except ServeError as exc:
        exc = api.as_tfserving(exc)
        status = exc.grpc_code.lower()
        raise exc from None
    finally:
        seconds = time.monotonic() - started
        srv.metrics.observe_request(name, version, PROTOCOL, status, seconds)
        srv.audit.record(PROTOCOL, name, version, client, status, seconds)


async def model_status(request: web.Request) -> web.Response:
    answer = await api.status(server(request), request.match_info["model"], _version(request))
    return web.json_response(answer)


async def model_metadata(request: web.Request) -> web.Response:
    model = api.lookup(server(request), request.match_info["model"], _version(request))
    return web.json_response(api.metadata(model, ["signature_def"]))


async def unimplemented(request: web.Request) -> web.Response:
    raise api.TFServingError("UNIMPLEMENTED", f"{request.match_info['verb']} is not served: modelseal serves "
                             "Predict (:predict) on each model's own signature")  # fmt: skip


def routes() -> list[web.RouteDef]:
    return [
        web.post(f"{MODEL}:predict", predict),
        web.post(f"{VERSIONED}:predict", predict),
        web.post(MODEL + ":{verb:classify|regress}", unimplemented),
        web.post(VERSIONED + ":{verb:classify|regress}", unimplemented),
        web.get(MODEL, model_status),
        web.get(VERSIONED, model_status),
        web.get(f"{MODEL}/metadata", model_metadata),
        web.get(f"{VERSIONED}/metadata", model_metadata),
    ]
