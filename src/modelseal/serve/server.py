"""Run ``modelseal serve``: load the repository's models, serve HTTP and gRPC, shut down gracefully.

On SIGTERM/SIGINT the server stops accepting requests, lets in-flight ones finish (``drain_s``), then
unloads every model, which closes its runtimes and drops the decrypted weights and keys.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from modelseal import pki
from modelseal.errors import UsageError
from modelseal.recipients.parse import IdentitySpec
from modelseal.serve.audit import AuditLog
from modelseal.serve.errors import ServeError
from modelseal.serve.metrics import Metrics
from modelseal.serve.models import ModelManager
from modelseal.serve.repository import Repository

log = logging.getLogger("modelseal.serve")


@dataclass
class ServeConfig:
    repository: Path
    http: str | None = "127.0.0.1:8000"
    grpc: str | None = "127.0.0.1:8001"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate it issued (mTLS)
    identity: IdentitySpec | None = None
    agent_socket: str | None = None
    models: list[str] = field(default_factory=list)  # empty: every model in the repository
    key_check_s: float = 5
    retry_s: float = 30
    max_body_bytes: int = 64 * 1024 * 1024
    audit_log: Path | None = None
    drain_s: float = 10
    threads: int = 0
    trusted_signers: list[str] = field(default_factory=list)  # set: serve only models these publishers signed

    def agent(self) -> str | None:
        if self.agent_socket:
            return self.agent_socket
        if isinstance(self.identity, str) and self.identity.startswith("agent:"):
            return self.identity.removeprefix("agent:")
        return None if self.identity else os.environ.get("MODELSEAL_AGENT_SOCKET")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise UsageError(f"bad listen address {address!r} (HOST:PORT)") from None


class Server:
    def __init__(self, config: ServeConfig) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        if config.client_ca and not config.tls_cert:
            raise UsageError("--client-ca (mTLS) needs --tls-cert and --tls-key")
        self.config = config
        self.metrics = Metrics()
        self.audit = AuditLog(config.audit_log)
        self.models = ModelManager(
            Repository(config.repository), config.identity, self.metrics, agent_socket=config.agent(),
            key_check_s=config.key_check_s, retry_s=config.retry_s, threads=config.threads,
            trusted_signers=config.trusted_signers,
        )  # fmt: skip
        self.ready = False
        self.stopping = asyncio.Event()

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
            except ServeError as exc:
                log.error("%s", exc)  # the model stays UNAVAILABLE with this reason; others still serve

    async def run(self) -> None:
        from modelseal.agent.memory import harden_process
        from modelseal.serve.grpc_api import build_server
        from modelseal.serve.rest import build_app

        harden_process()  # decrypted weights live in this process: no core dumps, no ptrace by other users
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        runner = grpc_server = None
        try:
            if self.config.http:
                runner = web.AppRunner(build_app(self, self.config.max_body_bytes), access_log=None)
                await runner.setup()
                host, port = split_address(self.config.http)
                await web.TCPSite(runner, host, port, ssl_context=self.ssl_context()).start()
            if self.config.grpc:
                grpc_server = build_server(self, self.config.grpc, self.grpc_tls(), self.config.max_body_bytes)
                await grpc_server.start()
            scheme = "https" if self.config.tls_cert else "http"
            log.info("serving %s: HTTP %s, gRPC %s%s", self.config.repository, f"{scheme}://{self.config.http}",
                     self.config.grpc, " (mTLS)" if self.config.client_ca else "")  # fmt: skip
            await self.load_models()
            self.models.start()
            self.ready = True
            log.info("server ready: %s", ", ".join(f"{m['name']} {m['state']}" for m in self.models.index()))
            await self.stopping.wait()
        finally:
            self.ready = False
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
