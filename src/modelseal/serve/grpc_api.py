"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on grpcio's asyncio server.

The service is generated from ``protocol/inference.proto`` by grpcio-tools at start-up. grpcio exposes
the verified client certificate (``context.auth_context()``), which names the caller in audit records.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from modelseal.listening import cannot_listen, normalise_address
from modelseal.pki import peer_identity
from modelseal.serve.errors import ServeError
from modelseal.serve.infer import decode_grpc, server_metadata
from modelseal.serve.metering import rate_client
from modelseal.serve.protocol import inference, model_config
from modelseal.serve.rest import OFFLOAD_BYTES, load_config_override

log = logging.getLogger("modelseal.serve")


def client_identity(context: Any) -> str:
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return "anonymous"
    der = x509.load_pem_x509_certificate(pems[0]).public_bytes(Encoding.DER)
    return peer_identity(der).spki


def trailing_metadata(exc: ServeError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` (whole seconds) for a refusal that knows when to retry, as HTTP's header says it."""
    return (("retry-after", str(exc.retry_after)),) if exc.retry_after else ()


def build_servicer(srv: Any) -> Any:
    """The servicer bound to a running :class:`~modelseal.serve.server.Server`."""
    import grpc

    pb, services = inference()

    async def abort(context: Any, exc: ServeError) -> None:
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc), trailing_metadata(exc))

    class InferenceServicer(services.GRPCInferenceServiceServicer):  # type: ignore[misc,name-defined]
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (protocol names)
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=srv.ready)

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                srv.models.get(request.name, request.version)
            except ServeError as exc:
                if exc.status == 404:  # an unknown model (or version) is NOT_FOUND, as over HTTP
                    await abort(context, exc)
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
            from google.protobuf import json_format

            try:
                config = srv.models.config(srv.models.get(request.name, request.version))
            except ServeError as exc:
                await abort(context, exc)
            message = json_format.ParseDict(config, model_config().ModelConfig())
            return pb.ModelConfigResponse(config=message)

        async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
            from google.protobuf import json_format

            try:
                stats = srv.models.statistics(request.name, request.version)
            except ServeError as exc:
                await abort(context, exc)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerMetadataResponse(**server_metadata())

        async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                meta = srv.models.metadata(srv.models.get(request.name, request.version))
            except ServeError as exc:
                await abort(context, exc)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
            )  # fmt: skip

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            started = time.monotonic()
            name, version = request.model_name, request.model_version
            client = client_identity(context)

            def record(status: str) -> None:  # before the reply, so the audit log is never behind a client
                seconds = time.monotonic() - started
                srv.metrics.observe_request(name, version, "grpc", status, seconds)
                srv.audit.record("grpc", name, version, client, status, seconds)

            size = request.ByteSize()  # already received by gRPC: charged before it is decoded or run
            try:
                srv.budget.take(size)
                try:
                    model = srv.models.get(name, version)
                    version = str(model.version)
                    if size >= OFFLOAD_BYTES:
                        decoded = await asyncio.to_thread(decode_grpc, request)
                    else:
                        decoded = decode_grpc(request)
                    results = await srv.models.infer(model, decoded.inputs, decoded.outputs,
                                                   client=rate_client(client, context.peer()))
                finally:
                    srv.budget.release(size)
                answer = functools.partial(decoded.respond, name, version, results, model.spec, model.labels)
                if decoded.classification:  # sorting and formatting classes: off the event loop
                    response = (await asyncio.to_thread(answer)).grpc(pb)
                else:
                    response = answer().grpc(pb)
            except ServeError as exc:
                record(exc.grpc_code.lower())
                await abort(context, exc)
            except asyncio.CancelledError:
                record("cancelled")
                raise
            except Exception as exc:  # a bug, not bad input: INTERNAL naming the kind, never UNKNOWN
                log.exception("gRPC inference on %s failed", name)
                record("internal")
                await abort(context, ServeError(500, f"internal error ({type(exc).__name__})"))
            record("ok")
            return response

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[entry(**m) for m in srv.models.index(request.ready)])

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
            parameters = {key: p.string_param if p.HasField("string_param") else p.bytes_param.decode(errors="replace")
                          for key, p in request.parameters.items()}  # fmt: skip
            try:
                await srv.models.load(request.model_name, load_config_override(parameters))
            except ServeError as exc:
                await abort(context, exc)
            srv.audit.record("grpc", request.model_name, "", client_identity(context), "load", 0.0)
            return pb.RepositoryModelLoadResponse()

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
            name = request.model_name
            try:
                if name not in srv.models.models and name not in srv.models.repository.names():
                    raise ServeError(404, f"unknown model {name[:200]!r}")
                await srv.models.unload(name, "unloaded through the repository API")  # not loaded: a success
            except ServeError as exc:
                await abort(context, exc)
            srv.audit.record("grpc", request.model_name, "", client_identity(context), "unload", 0.0)
            return pb.RepositoryModelUnloadResponse()

    return InferenceServicer()


def build_server(srv: Any, address: str, tls: tuple[bytes, bytes, bytes | None] | None, max_message: int) -> Any:
    """A grpc.aio server on ``address``; ``tls`` = (cert PEM, key PEM, client CA PEM or None for TLS only)."""
    import grpc

    address = normalise_address(address)  # gRPC refuses an empty host (':PORT')
    _, services = inference()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),  # a port another server holds is an error, not silently shared
        ]
    )
    services.add_GRPCInferenceServiceServicer_to_server(build_servicer(srv), server)
    from modelseal.serve.tfserving.grpc_api import build_handlers

    server.add_generic_rpc_handlers(build_handlers(srv))  # TF Serving's PredictionService and ModelService
    from modelseal.serve.server import port_fix

    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            cert, key, client_ca = tls
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio: "Failed to bind to address" (check_free ran first: a race or a bad address)
        raise cannot_listen("gRPC", address, None, port_fix("gRPC")) from None
    if port == 0:
        raise cannot_listen("gRPC", address, None, port_fix("gRPC"))
    return server
