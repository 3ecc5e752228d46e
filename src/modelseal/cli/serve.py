"""``modelseal serve``: serve a model repository of sealed models over KServe V2 HTTP and gRPC."""

from __future__ import annotations

from pathlib import Path

import click

from modelseal.cli.helptext import IDENTITY_VARS, REMOTE_VARS, Command, Group
from modelseal.cli.kit import emit, fail_closed, json_option


@click.command(
    "serve",
    cls=Command,
    reads=[
        *IDENTITY_VARS,
        "MODELSEAL_THREADS",
        "MODELSEAL_HUGEPAGES",
        "MODELSEAL_PREFAULT",
        *REMOTE_VARS,
        ("VAR", "The variable -i env:VAR names: identity text."),
    ],
    writes=[("--audit-log FILE", "One JSON line per request, appended (created mode 0600).")],
)
@click.option(
    "--repository",
    "-r",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Model repository (Triton layout: NAME/config.pbtxt|yaml, NAME/VERSION/model...).",
)
@click.option("--http", default="127.0.0.1:8000", show_default=True, help="HTTP listen address, or 'off'.")
@click.option("--grpc", default="127.0.0.1:8001", show_default=True, help="gRPC listen address, or 'off'.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Server certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="Server key.")
@click.option(
    "--client-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Require client certificates from this CA (mTLS) on both protocols.",
)
@click.option(
    "-i",
    "--identity",
    help="Key for sealed models: agent:SOCKET, a key file, env:VAR, passphrase-env:VAR or the key text "
    "itself (default $MODELSEAL_IDENTITY, then $MODELSEAL_AGENT_SOCKET).",
)
@click.option("--agent-socket", help="Agent to watch for dropped keys (default: the identity's agent).")
@click.option("--model", "models", multiple=True, help="Load only these models (default: all).")
@click.option("--key-check", "key_check_s", default=5.0, show_default=True, help="Seconds between key checks.")
@click.option(
    "--retry",
    "retry_s",
    default=30.0,
    show_default=True,
    help="Seconds between reload attempts of a model whose key was dropped.",
)
@click.option("--max-body-mb", default=64, show_default=True, help="Largest request body / gRPC message.")
@click.option(
    "--max-inflight-mb",
    default=256,
    show_default=True,
    help="Request bytes in flight over HTTP and gRPC together; past it: HTTP 429 / RESOURCE_EXHAUSTED.",
)
@click.option(
    "--body-timeout",
    "body_timeout_s",
    default=60.0,
    show_default=True,
    help="Seconds an HTTP request body may take to arrive (past it: 408).",
)
@click.option(
    "--usage-sync-s",
    "usage_sync_s",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.01, max=60),
    help="Seconds between usage reports to the agent (licence metering; with an agent:... identity); a "
    "killed server loses at most one interval's counts.",
)
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), help="Per-request audit file (JSONL).")
@click.option("--threads", default=0, help="Intra-op threads per instance (0: the runtime's default).")
@click.option(
    "--trusted-signer",
    "trusted_signers",
    multiple=True,
    help="Serve only models signed by this publisher key (ed25519:...); repeatable.",
)
@click.option(
    "--strict-config",
    is_flag=True,
    help="Require every model's config to declare its platform, inputs and outputs (no auto-completion).",
)
@click.option(
    "--default-max-batch-size",
    default=4,
    show_default=True,
    type=click.IntRange(0, 1 << 20),
    help="max_batch_size of a config completed from a model whose first dimension is variable (0: no batching).",
)
@click.option("--log-json", is_flag=True, help="Log one JSON object per line (for log collectors).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too (never key material).")
@fail_closed
def serve(repository: Path, http: str, grpc: str, tls_cert: Path | None, tls_key: Path | None,
          client_ca: Path | None, identity: str | None, agent_socket: str | None, models: tuple[str, ...],
          key_check_s: float, retry_s: float, max_body_mb: int, max_inflight_mb: int, body_timeout_s: float,
          usage_sync_s: float, audit_log: Path | None, threads: int, trusted_signers: tuple[str, ...],
          strict_config: bool, default_max_batch_size: int, log_json: bool, verbose: bool) -> None:  # fmt: skip
    """Serve the sealed models of a repository to tritonclient / KServe clients, HTTP and gRPC.

    Weights are decrypted in memory only, with keys from the host agent; a model whose key the agent
    drops (grant revoked) is unloaded and comes back when it is granted again. Requests are counted and
    held to the grant's licence terms (quotas, rate limits), the counts reported to the agent.
    """
    from modelseal.cli.logs import configure
    from modelseal.serve.server import ServeConfig, run

    configure(verbose, log_json)
    run(
        ServeConfig(
            repository=repository, http=None if http == "off" else http, grpc=None if grpc == "off" else grpc,
            tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca, identity=identity,
            agent_socket=agent_socket, models=list(models), key_check_s=key_check_s, retry_s=retry_s,
            max_body_bytes=max_body_mb * 1024 * 1024, max_inflight_bytes=max_inflight_mb * 1024 * 1024,
            body_timeout_s=body_timeout_s, usage_sync_s=usage_sync_s,
            audit_log=audit_log, threads=threads,
            trusted_signers=list(trusted_signers), strict_config=strict_config,
            default_max_batch_size=default_max_batch_size,
        )
    )  # fmt: skip


@click.group("bench", cls=Group)
def bench() -> None:
    """Load generators and benchmarks."""


@bench.command("client")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Server HOST:PORT.")
@click.option(
    "--protocol", type=click.Choice(["grpc", "http", "tfserving"]), default="grpc", show_default=True,
    help="Open Inference Protocol over gRPC or HTTP (tritonclient), or TF Serving's gRPC API (tfserving: "
    "PredictionService.Predict, against modelseal serve's gRPC port or TensorFlow Serving).",
)  # fmt: skip
@click.option("-m", "--model", required=True, help="Model name.")
@click.option("--batch", default=1, show_default=True, help="Rows per request.")
@click.option("--cnum", "concurrency", default=1, show_default=True, help="Concurrent clients.")
@click.option("--loop", "requests", default=50, show_default=True, help="Requests per client.")
@click.option("--json-tensors", is_flag=True, help="HTTP: send tensors as JSON instead of the binary extension.")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), help="Server CA (enables TLS).")
@click.option("--cert", type=click.Path(dir_okay=False, exists=True), help="Client certificate (mTLS).")
@click.option("--key", type=click.Path(dir_okay=False, exists=True), help="Client key (mTLS).")
@json_option
@fail_closed
def bench_client(url: str, protocol: str, model: str, batch: int, concurrency: int, requests: int,
                 json_tensors: bool, ca: str | None, cert: str | None, key: str | None,
                 as_json: bool) -> None:  # fmt: skip
    """Send requests to an inference server; print throughput and latency percentiles.

    Like TF Serving's `resnet_client_grpc.py -batch 1 -cnum 1 -loop 50`: over the Open Inference Protocol
    with the official tritonclient, or over TF Serving's own gRPC API (--protocol tfserving).
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from modelseal.serve.loadgen import Target, run

    target = Target(url, protocol, model, ca, cert, key, binary=not json_tensors)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), disable=as_json,
                  transient=True) as progress:  # fmt: skip
        progress.add_task(f"{concurrency} x {requests} requests of batch {batch} to {model} ({protocol})")
        result = run(target, batch=batch, concurrency=concurrency, requests=requests)
    emit(
        as_json,
        result,
        [
            f"{result['requests']} requests ({result['errors']} errors) in {result['seconds']:.2f} s: "
            f"{result['requests_per_s']:.1f} req/s, {result['inferences_per_s']:.1f} inferences/s",
            f"latency p50 {result['p50_ms']:.2f} ms, p90 {result['p90_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms",
        ],
    )
