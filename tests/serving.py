"""A real `modelseal serve` subprocess with tritonclient clients for the serving tests; the test models
(``bench.models``) are re-exported here for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from bench.models import CONFIG, add_model, export_onnx, export_torchscript, resnet50, small_cnn

from modelseal import pki
from modelseal.devstack import Serve

__all__ = [
    "CONFIG", "ServeProcess", "Tls", "add_model", "compile_model_config", "export_onnx", "export_torchscript",
    "infer_grpc", "infer_http", "resnet50", "small_cnn",
]


def compile_model_config() -> None:
    """Compile the model-config messages in this process now, before any test imports TensorFlow:
    grpc_tools' protoc (which compiles them on first use, for reading config.pbtxt) crashes a process that
    has loaded TensorFlow's protobuf first; compiled, they are cached for the process. A server compiles
    them before it builds any TensorFlow model; test modules that import TensorFlow import this one first.
    (Not the inference service's messages: in a test process tritonclient's copies of them, same names,
    are already in protobuf's default pool.)"""
    from modelseal.errors import MissingDependencyError
    from modelseal.serve.protocol import model_config

    try:
        model_config()
    except (MissingDependencyError, ImportError, NotImplementedError):  # no grpcio(-tools): serving tests skip
        pass


compile_model_config()


class Tls:
    """A CA, a server certificate for localhost and client certificates, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        pki.init_ca(directory)
        self.cert, self.key = (str(p) for p in pki.issue(directory, "server", server_names=["localhost", "127.0.0.1"]))
        self.ca = str(directory / "ca.pem")

    def client(self, name: str) -> tuple[str, str]:
        cert, key = pki.issue(self.dir, name)
        return str(cert), str(key)


class ServeProcess(Serve):
    """`modelseal serve` (:class:`modelseal.devstack.Serve`), started at once, with tritonclient clients
    that match its TLS settings."""

    def __init__(
        self, repo: Path, log: Path, *, tls: Tls | None = None, mtls: bool = True,
        env: dict[str, str] | None = None, extra: list[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            repo, log, args=extra or (), env=env,
            tls=(tls.cert, tls.key) if tls else None, client_ca=tls.ca if tls and mtls else None,
        )  # fmt: skip
        self.tls = tls
        self.start()

    def http_client(self, cert: tuple[str, str] | None = None) -> Any:
        import tritonclient.http as httpclient

        if self.tls is None:
            return httpclient.InferenceServerClient(self.http)
        options = {"ca_certs": self.tls.ca}
        if cert:
            options.update(certfile=cert[0], keyfile=cert[1])
        return httpclient.InferenceServerClient(self.http, ssl=True, ssl_options=options, insecure=False)

    def grpc_client(self, cert: tuple[str, str] | None = None) -> Any:
        import tritonclient.grpc as grpcclient

        if self.tls is None:
            return grpcclient.InferenceServerClient(self.grpc)
        return grpcclient.InferenceServerClient(
            self.grpc, ssl=True, root_certificates=self.tls.ca,
            private_key=cert[1] if cert else None, certificate_chain=cert[0] if cert else None,
        )  # fmt: skip


def infer_http(client: Any, model: str, batch: np.ndarray, binary: bool = True) -> np.ndarray:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    return client.infer(model, [inp], outputs=[out]).as_numpy("output")


def infer_grpc(client: Any, model: str, batch: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("output")]).as_numpy("output")
