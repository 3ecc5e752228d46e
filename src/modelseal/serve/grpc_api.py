"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on grpcio's asyncio server.

The service is generated from ``protocol/inference.proto`` by grpcio-tools at start-up. grpcio exposes
the verified client certificate (``context.auth_context()``), which names the caller in audit records.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from modelseal.pki import peer_identity
from modelseal.serve import datatypes
from modelseal.serve.errors import ServeError, bad_request
from modelseal.serve.protocol import inference


def client_identity(context: Any) -> str:
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return "anonymous"
    der = x509.load_pem_x509_certificate(pems[0]).public_bytes(Encoding.DER)
    return peer_identity(der).spki


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        try:
            dtype = datatypes.numpy_dtype(tensor.datatype)
        except Exception as exc:
            raise bad_request(f"input {tensor.name}: {exc}") from None
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            raise bad_request(f"input {tensor.name}: negative dimension in shape {shape}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        try:
            if raw:
                if len(raw[i]) != count * dtype.itemsize:
                    raise bad_request(
                        f"input {tensor.name}: {len(raw[i])} raw bytes do not match shape {shape} of {tensor.datatype}"
                    )
                array = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
            else:
                field = datatypes.CONTENTS_FIELD.get(tensor.datatype)
                if field is None:
                    raise bad_request(f"input {tensor.name}: {tensor.datatype} must be sent as raw_input_contents")
                values = np.asarray(list(getattr(tensor.contents, field)), dtype=dtype)
                if values.size != count:
                    raise bad_request(f"input {tensor.name}: {values.size} values do not fill shape {shape}")
                array = values.reshape(shape)
        except ValueError as exc:
            raise bad_request(f"input {tensor.name}: {exc}") from None
        if tensor.name in arrays:
            raise bad_request(f"input {tensor.name} is given twice")
        arrays[tensor.name] = array
    if not arrays:
        raise bad_request("the request has no inputs")
    return arrays


def build_servicer(srv: Any) -> Any:
    """The servicer bound to a running :class:`~modelseal.serve.server.Server`."""
    import grpc

    from modelseal import __version__

    pb, services = inference()

    async def abort(context: Any, exc: ServeError) -> None:
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))

    class InferenceServicer(services.GRPCInferenceServiceServicer):  # type: ignore[misc,name-defined]
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (protocol names)
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=srv.ready)

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                srv.models.get(request.name, request.version)
            except ServeError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            from modelseal.serve.rest import EXTENSIONS

            return pb.ServerMetadataResponse(name="modelseal", version=__version__, extensions=EXTENSIONS)

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

            def record(status: str) -> None:  # before the reply, so the audit log is never behind a client
                seconds = time.monotonic() - started
                srv.metrics.observe_request(name, version, "grpc", status, seconds)
                srv.audit.record("grpc", name, version, client_identity(context), status, seconds)

            try:
                model = srv.models.get(name, version)
                version = str(model.version)
                results = await srv.models.infer(model, decode_inputs(request), [o.name for o in request.outputs])
                response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
                for out_name, array in results.items():
                    response.outputs.add(name=out_name, datatype=datatypes.v2_name(array.dtype), shape=array.shape)
                    response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
            except ServeError as exc:
                record(exc.grpc_code.lower())
                await abort(context, exc)
            except BaseException:
                record("error")
                raise
            record("ok")
            return response

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[entry(**m) for m in srv.models.index(request.ready)])

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                await srv.models.load(request.model_name)
            except ServeError as exc:
                await abort(context, exc)
            srv.audit.record("grpc", request.model_name, "", client_identity(context), "load", 0.0)
            return pb.RepositoryModelLoadResponse()

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                srv.models.get(request.model_name)
                await srv.models.unload(request.model_name, "unloaded through the repository API")
            except ServeError as exc:
                await abort(context, exc)
            srv.audit.record("grpc", request.model_name, "", client_identity(context), "unload", 0.0)
            return pb.RepositoryModelUnloadResponse()

    return InferenceServicer()


def build_server(srv: Any, address: str, tls: tuple[bytes, bytes, bytes | None] | None, max_message: int) -> Any:
    """A grpc.aio server on ``address``; ``tls`` = (cert PEM, key PEM, client CA PEM or None for TLS only)."""
    import grpc

    _, services = inference()
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]
    )
    services.add_GRPCInferenceServiceServicer_to_server(build_servicer(srv), server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        cert, key, client_ca = tls
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise ServeError(500, f"cannot listen for gRPC on {address}")
    return server
