"""A load generator for inference servers: ``-batch``, ``-cnum`` (concurrent clients) and ``-loop``
(requests per client) as in TF Serving's ``resnet_client_grpc.py``. Over the Open Inference Protocol
(``grpc``, ``http``) with the official tritonclient, against modelseal serve, Triton, KServe or anything
speaking V2; over TF Serving's gRPC API (``tfserving``) against modelseal serve or TensorFlow Serving."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.serve import datatypes


@dataclass(frozen=True)
class Target:
    url: str  # host:port
    protocol: str  # http | grpc | tfserving
    model: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    binary: bool = True  # HTTP: binary tensor extension (tritonclient's default) or JSON

    def client(self) -> Any:
        if self.protocol == "tfserving":
            from modelseal.serve.tfserving.client import TFServingClient

            return TFServingClient(self.url, self.ca, self.cert, self.key)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as grpcclient

                if not self.ca:
                    return grpcclient.InferenceServerClient(self.url)
                return grpcclient.InferenceServerClient(
                    self.url, ssl=True, root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
                )
            import tritonclient.http as httpclient
        except ImportError:
            raise MissingDependencyError(
                "the load generator needs tritonclient: pip install 'modelseal[bench]'"
            ) from None
        if not self.ca:
            return httpclient.InferenceServerClient(self.url)
        options = {"ca_certs": self.ca, **({"certfile": self.cert, "keyfile": self.key} if self.cert else {})}
        return httpclient.InferenceServerClient(self.url, ssl=True, ssl_options=options)

    def call(self, client: Any, inputs: Any, outputs: Any) -> None:
        """Send one request made by :meth:`request` with a client made by :meth:`client`."""
        if self.protocol == "tfserving":
            client.predict(inputs)
        else:
            client.infer(self.model, inputs, outputs=outputs)

    def request(self, batch: int, seed: int = 0) -> tuple[Any, Any]:
        """Inputs (random, of the model's declared shapes) and requested outputs for one request."""
        client = self.client()
        if self.protocol == "tfserving":
            signature = client.signature(self.model)
            arrays = {name: random_tensor(name, datatype, shape, batch, seed)
                      for name, datatype, shape in signature["inputs"]}  # fmt: skip
            return client.request(self.model, arrays), None
        meta = client.get_model_metadata(self.model)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            meta = MessageToDict(meta, preserving_proto_field_name=True)
        module = __import__(f"tritonclient.{self.protocol}", fromlist=["InferInput"])
        inputs = []
        for spec in meta["inputs"]:
            data = random_tensor(spec["name"], spec["datatype"], spec["shape"], batch, seed)
            inp = module.InferInput(spec["name"], list(data.shape), spec["datatype"])
            if self.protocol == "http":
                inp.set_data_from_numpy(data, binary_data=self.binary)
            else:
                inp.set_data_from_numpy(data)
            inputs.append(inp)
        if self.protocol == "http":
            outputs = [module.InferRequestedOutput(o["name"], binary_data=self.binary) for o in meta["outputs"]]
        else:
            outputs = [module.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
        return inputs, outputs


def random_tensor(name: str, datatype: str, declared: list[Any], batch: int, seed: int) -> np.ndarray:
    """Random values (ones for non-float types) of a declared shape, ``batch`` rows for a leading -1."""
    shape = [int(d) for d in declared]
    if shape and shape[0] == -1:
        shape[0] = batch
    if any(d < 0 for d in shape):
        raise UsageError(f"input {name} has variable dimensions {shape}; cannot make a request")
    dtype = datatypes.numpy_dtype(datatype)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(target: Target, batch: int = 1, concurrency: int = 1, requests: int = 50, warmup: int = 3) -> dict[str, Any]:
    """``concurrency`` clients each send ``requests`` requests of ``batch`` rows, one after another."""
    inputs, outputs = target.request(batch)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)

    def worker() -> None:
        client = target.client()
        for _ in range(warmup):
            target.call(client, inputs, outputs)
        start_gate.wait()
        mine = []
        for _ in range(requests):
            t = time.perf_counter()
            try:
                target.call(client, inputs, outputs)
            except Exception as exc:  # counted and reported, not fatal to the run
                with lock:
                    errors.append(str(exc)[:200])
                continue
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    start_gate.wait()
    began = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - began
    if not latencies:
        raise UsageError(f"every request failed: {errors[:1]}")
    return {
        "protocol": target.protocol,
        "model": target.model,
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "inferences_per_s": len(latencies) * batch / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p90_ms": 1000 * percentile(latencies, 0.90),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }
