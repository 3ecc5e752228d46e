"""TF Serving's gRPC services on ``modelseal serve``'s gRPC port: ``tensorflow.serving.PredictionService``
(``Predict``, ``GetModelMetadata``) and ``tensorflow.serving.ModelService`` (``GetModelStatus``), beside
the Open Inference Protocol, with the same TLS/mTLS, in-flight byte budget and audit records.

The handlers are registered under TF Serving's service names with grpcio's generic handlers, and take
the raw request bytes: a message that does not decode is an INVALID_ARGUMENT answer naming the method,
not grpcio's bare INTERNAL, and its size is charged to the budget before it is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from modelseal.serve.errors import ServeError
from modelseal.serve.grpc_api import client_identity, trailing_metadata
from modelseal.serve.metering import rate_client
from modelseal.serve.protocol import tfserving
from modelseal.serve.rest import OFFLOAD_BYTES
from modelseal.serve.tfserving import api
from modelseal.serve.tfserving.tensors import decoded_size, from_proto, to_proto

log = logging.getLogger("modelseal.serve")
PROTOCOL = "tfserving-grpc"  # in metrics and audit records


def _version(spec: Any) -> tuple[int | None, str]:
    """(version or None, label) of a request's ``ModelSpec``."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, ""
    return None, spec.version_label if choice == "version_label" else ""


def build_handlers(srv: Any) -> list[Any]:
    """The generic handlers of both services, bound to a running :class:`~modelseal.serve.server.Server`."""
    import grpc

    pb = tfserving()
    dtype_names = {v.number: v.name for v in pb.enums["DataType"].values}

    async def abort(context: Any, exc: ServeError) -> None:
        exc = api.as_tfserving(exc)
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc), trailing_metadata(exc))

    def decode(kind: Any, data: bytes, method: str) -> Any:
        try:
            return kind.FromString(data)
        except DecodeError:
            message = f"the {method} request is not a valid protobuf message"
            raise api.TFServingError("INVALID_ARGUMENT", message) from None

    def decode_predict(request: Any) -> dict[str, Any]:
        limit = srv.config.max_body_bytes
        return {name: from_proto(name, t, dtype_names, limit) for name, t in request.inputs.items()}

    async def predict(data: bytes, context: Any) -> Any:
        started = time.monotonic()
        name, version, status, charged = "", "", "error", 0
        client = client_identity(context)
        try:
            srv.budget.take(len(data))  # already received: charged before it is decoded or run
            charged = len(data)
            request = decode(pb.PredictRequest, data, "Predict")
            name = request.model_spec.name
            model = api.lookup(srv, name, *_version(request.model_spec))
            version = str(model.version)
            signature = api.check_signature(model, request.model_spec.signature_name)
            api.check_input_names(model, list(request.inputs))
            outputs = api.check_outputs(model, list(request.output_filter))
            # what the inputs take once decoded (TensorFlow's fill rule makes it more than the message):
            # bounded by the request limit and charged to the budget before anything is allocated
            decoded = sum(decoded_size(n, t, dtype_names) for n, t in request.inputs.items())
            if decoded > srv.config.max_body_bytes:
                raise ServeError(413, f"the inputs would take {decoded} bytes once decoded, over the request "
                                      f"limit of {srv.config.max_body_bytes} bytes")  # fmt: skip
            srv.budget.take(max(0, decoded - charged))
            charged = max(charged, decoded)
            if charged >= OFFLOAD_BYTES:
                inputs = await asyncio.to_thread(decode_predict, request)
            else:
                inputs = decode_predict(request)
            del request
            results = await api.predict(srv, model, inputs, outputs, rate_client(client, context.peer()))
            response = pb.PredictResponse()
            json_format.ParseDict(api.model_spec(model, signature), response.model_spec)
            for key, array in results.items():
                to_proto(array, response.outputs[key])
            status = "ok"
            return response.SerializeToString()
        except ServeError as exc:
            status = api.as_tfserving(exc).grpc_code.lower()
            await abort(context, exc)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # a bug, not bad input: INTERNAL naming the kind
            log.exception("TF Serving Predict on %s failed", name[:200])
            status = "internal"
            await abort(context, ServeError(500, f"internal error ({type(exc).__name__})"))
        finally:
            srv.budget.release(charged)
            seconds = time.monotonic() - started
            srv.metrics.observe_request(name, version, PROTOCOL, status, seconds)
            srv.audit.record(PROTOCOL, name, version, client, status, seconds)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def get_model_metadata(data: bytes, context: Any) -> Any:
        try:
            request = decode(pb.GetModelMetadataRequest, data, "GetModelMetadata")
            model = api.lookup(srv, request.model_spec.name, *_version(request.model_spec))
            answer = api.metadata(model, list(request.metadata_field))
            response = pb.GetModelMetadataResponse()
            json_format.ParseDict(answer["model_spec"], response.model_spec)
            signatures = json_format.ParseDict(answer["metadata"]["signature_def"], pb.SignatureDefMap())
            packed = response.metadata["signature_def"]  # TF Serving's type name, not this package's
            packed.type_url, packed.value = api.SIGNATURE_DEF_TYPE, signatures.SerializeToString()
            return response.SerializeToString()
        except ServeError as exc:
            await abort(context, exc)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def get_model_status(data: bytes, context: Any) -> Any:
        try:
            request = decode(pb.GetModelStatusRequest, data, "GetModelStatus")
            version, label = _version(request.model_spec)
            api.refuse_label(label)
            answer = await api.status(srv, request.model_spec.name, version)
            return json_format.ParseDict(answer, pb.GetModelStatusResponse()).SerializeToString()
        except ServeError as exc:
            await abort(context, exc)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def unary(fn: Callable[[bytes, Any], Awaitable[Any]]) -> Any:
        return grpc.unary_unary_rpc_method_handler(fn)  # bytes in, bytes out: (de)serialized here

    return [
        grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            "Predict": unary(predict), "GetModelMetadata": unary(get_model_metadata),
        }),
        grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
            "GetModelStatus": unary(get_model_status),
        }),
    ]  # fmt: skip
