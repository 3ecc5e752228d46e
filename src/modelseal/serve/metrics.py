"""Prometheus metrics of the server (served at ``/metrics`` on the HTTP port): requests, latency,
batch sizes, model loads and unloads, key fetches, requests refused by a licence limit and each licence's
usage. Labels carry model names and outcomes only."""

from __future__ import annotations

from collections.abc import Callable

from modelseal.errors import MissingDependencyError

UNKNOWN = "(unknown)"


class Metrics:
    """``labels`` maps the model and version a request named to the labels it is counted under: a name
    chosen by a client becomes a label only when the server knows it (else every distinct unknown name,
    up to the message size, would be a series kept, and rendered at every scrape, for the server's life)."""

    labels: Callable[[str, str], tuple[str, str]] = staticmethod(lambda model, version: (UNKNOWN, ""))

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise MissingDependencyError("serving needs prometheus-client: pip install 'modelseal[serve]'") from None
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("modelseal_inference_requests", "Inference requests by outcome",
                                     ["model", "version", "protocol", "status"], registry=r)  # fmt: skip
        self.latency = prom.Histogram(
            "modelseal_inference_request_seconds", "Inference request latency (receive to reply)",
            ["model", "protocol"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_size = prom.Histogram("modelseal_batch_size", "Rows per model execution", ["model"],
                                         registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.loads = prom.Counter("modelseal_model_loads", "Model loads by outcome", ["model", "result"], registry=r)
        self.unloads = prom.Counter("modelseal_model_unloads", "Model unloads by reason", ["model", "reason"],
                                    registry=r)  # fmt: skip
        self.load_seconds = prom.Histogram("modelseal_model_load_seconds", "Time to decrypt and load a model",
                                           ["model"], registry=r)  # fmt: skip
        self.key_fetches = prom.Counter("modelseal_key_fetches", "Model keys obtained (or refused) at load",
                                        ["model", "result"], registry=r)  # fmt: skip
        self.ready = prom.Gauge(
            "modelseal_model_ready", "1 when the model is loaded and serving", ["model"], registry=r
        )
        self.licence_refusals = prom.Counter(
            "modelseal_licence_refusals", "Requests refused by a licence limit (kind: quota or rate)",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.licence_used = prom.Gauge(
            "modelseal_licence_used", "This period's usage of the model's licence as this server knows it "
            "(count: requests, items or tokens)", ["model", "count"], registry=r,
        )  # fmt: skip
        self.licence_limit = prom.Gauge(
            "modelseal_licence_limit", "The licence's limit per period, where it sets one", ["model", "count"],
            registry=r,
        )  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST

    def observe_request(self, model: str, version: str, protocol: str, status: str, seconds: float) -> None:
        model, version = self.labels(model, version)
        self.requests.labels(model, version, protocol, status).inc()
        self.latency.labels(model, protocol).observe(seconds)
