"""Run ``modelseal serve``: load the repository's models, serve HTTP and gRPC, shut down gracefully.

On SIGTERM/SIGINT the server stops accepting requests, lets in-flight ones finish (``drain_s``), sends
the agent the usage counts not yet reported, then unloads every model, which closes its runtimes and
drops the decrypted weights and keys.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web

from modelseal import pki
from modelseal.errors import UsageError
from modelseal.listening import cannot_listen, check_free, normalise_address, split_address
from modelseal.recipients.registry import IdentitySpec
from modelseal.serve.audit import AuditLog
from modelseal.serve.errors import ServeError
from modelseal.serve.limits import ByteBudget
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository

log = logging.getLogger("modelseal.serve")


MAX_USAGE_SYNC_S = 60  # counts not yet reported die with a killed server: bounded to one interval of traffic


@dataclass
class ServeConfig:
    repository: Path
    http: str | None = "127.0.0.1:8000"
    grpc: str | None = "127.0.0.1:8001"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate it issued (mTLS)
    identity: IdentitySpec | None = None  # None: $MODELSEAL_IDENTITY, else the agent at $MODELSEAL_AGENT_SOCKET
    agent_socket: str | None = None  # watched for revocations; None: the identity's agent, if it is one
    models: list[str] = field(default_factory=list)  # empty: every model in the repository
    key_check_s: float = 5
    retry_s: float = 30
    max_body_bytes: int = 64 * 1024 * 1024
    max_inflight_bytes: int = 256 * 1024 * 1024  # all request bodies/messages in flight together
    body_timeout_s: float = 60  # an HTTP request body must arrive within this
    audit_log: Path | None = None
    drain_s: float = 10
    threads: int = 0
    trusted_signers: list[str] = field(default_factory=list)  # set: serve only models these publishers signed
    strict_config: bool = False  # every model needs a config declaring platform, inputs and outputs
    default_max_batch_size: int = 4  # of a config completed from a model that batches (Triton's default)
    usage_sync_s: float = 1.0  # with an agent identity: how often usage counts go to the agent


def port_fix(what: str) -> str:
    """What an operator changes when ``what`` (HTTP or gRPC) cannot listen."""
    return f"pick another port with --{what.lower()}"


class Server:
    def __init__(self, config: ServeConfig) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        if config.client_ca and not config.tls_cert:
            raise UsageError("--client-ca (mTLS) needs --tls-cert and --tls-key")
        if not 0 < config.usage_sync_s <= MAX_USAGE_SYNC_S:  # a killed server loses at most one interval
            raise UsageError(f"--usage-sync-s must be above 0 and at most {MAX_USAGE_SYNC_S} seconds")
        if config.max_inflight_bytes < config.max_body_bytes:
            raise UsageError("--max-inflight-mb must be at least --max-body-mb (one request must fit)")
        # a bad port is one line now, and gRPC and aiohttp bind the same host:port (gRPC refuses ':PORT')
        self.config = config = replace(
            config,
            http=normalise_address(config.http) if config.http else None,
            grpc=normalise_address(config.grpc) if config.grpc else None,
        )
        self.budget = ByteBudget(config.max_inflight_bytes)
        self.metrics = Metrics()
        self.audit = AuditLog(config.audit_log)
        repository = Repository(config.repository, config.strict_config, config.default_max_batch_size)
        self.models = ModelManager(  # resolves the identity, once for the server's life
            repository, config.identity, self.metrics, agent_socket=config.agent_socket,
            key_check_s=config.key_check_s, retry_s=config.retry_s, threads=config.threads,
            trusted_signers=config.trusted_signers, usage_sync_s=config.usage_sync_s,
        )  # fmt: skip
        self.metrics.labels = self.models.labels  # client-chosen names become labels only when known
        self.started = False
        self.stopping = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Serving, and no loaded model's dynamic batcher is dead (its requests would not be answered)."""
        return self.started and not self.models.dead_batchers()

    def ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls_cert or not cfg.tls_key:
            return None
        ctx = pki.server_context(cfg.tls_cert, cfg.tls_key, str(cfg.client_ca) if cfg.client_ca else None)
        if cfg.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED  # no certificate, no connection
        return ctx

    def grpc_tls(self) -> tuple[bytes, bytes, bytes | None] | None:
        cfg = self.config
        if not cfg.tls_cert or not cfg.tls_key:
            return None
        return (
            cfg.tls_cert.read_bytes(),
            cfg.tls_key.read_bytes(),
            cfg.client_ca.read_bytes() if cfg.client_ca else None,
        )

    async def load_models(self) -> None:
        names = self.config.models or self.models.repository.names()
        for name in names:
            try:
                await self.models.load(name)
            except ServeError as exc:  # the model stays UNAVAILABLE with its reason; others still serve
                if exc.status == 404:  # (load failures are logged where they are recorded)
                    log.error("%s", exc)

    async def run(self) -> None:
        from modelseal.memory.locked import harden_process
        from modelseal.serve.grpc_api import build_server
        from modelseal.serve.rest import build_app

        harden_process()  # decrypted weights live in this process: no core dumps, no ptrace by other users
        for what, address in (("HTTP", self.config.http), ("gRPC", self.config.grpc)):
            if address:
                check_free(address, what, port_fix(what))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        runner = grpc_server = None
        try:
            if self.config.http:
                runner = web.AppRunner(build_app(self, self.config.max_body_bytes), access_log=None)
                await runner.setup()
                host, port = split_address(self.config.http)
                try:
                    await web.TCPSite(runner, host, port, ssl_context=self.ssl_context()).start()
                except OSError as exc:
                    raise cannot_listen("HTTP", self.config.http, exc, port_fix("HTTP")) from None
            if self.config.grpc:
                grpc_server = build_server(self, self.config.grpc, self.grpc_tls(), self.config.max_body_bytes)
                await grpc_server.start()
            scheme = "https" if self.config.tls_cert else "http"
            log.info("serving %s: HTTP %s, gRPC %s%s", self.config.repository, f"{scheme}://{self.config.http}",
                     self.config.grpc, " (mTLS)" if self.config.client_ca else "")  # fmt: skip
            await self.load_models()
            self.models.start()
            self.started = True
            log.info("server ready: %s", ", ".join(f"{m['name']} {m['state']}" for m in self.models.index()))
            await self.stopping.wait()
        finally:
            self.started = False
            log.info("shutting down: draining in-flight requests")
            if grpc_server is not None:
                await grpc_server.stop(self.config.drain_s)
            await self.models.drain(self.config.drain_s)
            if runner is not None:
                await runner.cleanup()
            await self.models.close()
            self.audit.close()


def run(config: ServeConfig) -> None:
    asyncio.run(Server(config).run())
