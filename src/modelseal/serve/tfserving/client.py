"""A small TF Serving gRPC client (Predict and GetModelMetadata) for the load generator: it speaks to
``modelseal serve`` or to TensorFlow Serving itself, with modelseal's copy of the messages, so it needs
neither TensorFlow nor the tensorflow-serving-api package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.serve.protocol import tfserving
from modelseal.serve.tfserving.tensors import V2_DTYPES, decoded_size, from_proto, to_proto

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
MAX_MESSAGE = 256 * 1024 * 1024


class TFServingClient:
    """One channel to ``url`` (host:port); TLS when ``ca`` is given, mTLS with ``cert`` and ``key``."""

    def __init__(self, url: str, ca: str | None = None, cert: str | None = None, key: str | None = None,
                 timeout_s: float = 60) -> None:  # fmt: skip
        try:
            import grpc
        except ImportError:
            raise MissingDependencyError("the TF Serving client needs grpcio: pip install 'modelseal[serve]'") from None
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        if ca:
            def read(path: str | None) -> bytes | None:
                return Path(path).read_bytes() if path else None

            credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
            self.channel = grpc.secure_channel(url, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(url, options=options)
        self.pb = tfserving()
        self.timeout_s = timeout_s
        self.dtype_names = {v.number: v.name for v in self.pb.enums["DataType"].values}
        self._predict = self.channel.unary_unary(PREDICT, self.pb.PredictRequest.SerializeToString,
                                                 self.pb.PredictResponse.FromString)  # fmt: skip
        self._metadata = self.channel.unary_unary(METADATA, self.pb.GetModelMetadataRequest.SerializeToString,
                                                  self.pb.GetModelMetadataResponse.FromString)  # fmt: skip

    def signature(self, model: str) -> dict[str, list[tuple[str, str, list[int]]]]:
        """The model's default signature: {"inputs"|"outputs": [(name, V2 datatype, shape with -1s)]}."""
        request = self.pb.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        packed = self._metadata(request, timeout=self.timeout_s).metadata["signature_def"]
        signatures = self.pb.SignatureDefMap.FromString(packed.value)
        chosen = signatures.signature_def.get("serving_default") or next(iter(signatures.signature_def.values()))
        return {
            side: [(name, V2_DTYPES.get(self.dtype_names.get(info.dtype, ""), "?"),
                    [d.size for d in info.tensor_shape.dim]) for name, info in sorted(getattr(chosen, side).items())]
            for side in ("inputs", "outputs")
        }  # fmt: skip

    def request(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> Any:
        request = self.pb.PredictRequest(output_filter=outputs or [])
        request.model_spec.name = model
        for name, array in inputs.items():
            to_proto(array, request.inputs[name])
        return request

    def predict(self, request: Any) -> dict[str, np.ndarray]:
        """The outputs, at most :data:`MAX_MESSAGE` bytes once decoded in all (whatever a server sends)."""
        response = self._predict(request, timeout=self.timeout_s)
        outputs = dict(response.outputs.items())
        if sum(decoded_size(n, t, self.dtype_names) for n, t in outputs.items()) > MAX_MESSAGE:
            raise UsageError(f"the server's answer would take more than {MAX_MESSAGE} bytes once decoded")
        return {name: from_proto(name, t, self.dtype_names, MAX_MESSAGE) for name, t in outputs.items()}

    def close(self) -> None:
        self.channel.close()
