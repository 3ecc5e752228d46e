"""Run the key service: harden the process, open its store, check its schema, load the keys, serve HTTPS."""

from __future__ import annotations

import logging
import socket

from aiohttp import web

from modelseal import pki
from modelseal.attest import Verifier, verifiers_from_config
from modelseal.errors import UsageError
from modelseal.keyserver.app import build_app
from modelseal.keyserver.config import KeyServerConfig
from modelseal.keyserver.service import KeyService
from modelseal.keyserver.store import open_store
from modelseal.listening import bind_tcp
from modelseal.memory.locked import harden_process


def verifiers(cfg: KeyServerConfig) -> dict[str, Verifier]:
    """The evidence verifiers configured by the file's ``[attestation]`` table, by kind."""
    try:
        return verifiers_from_config(cfg.attestation, cfg.path.parent)
    except UsageError as exc:
        raise UsageError(f"{cfg.path}: {exc}") from None


def build_service(cfg: KeyServerConfig, migrate: bool = True) -> KeyService:
    """The key service ``cfg`` describes, on its database (migrated first unless ``migrate`` is False)."""
    checked = verifiers(cfg)
    store = open_store(cfg.database, migrate)
    return KeyService(store, cfg.master_key(), cfg.signer(), cfg.settings, checked, cfg.refusals)


def run(cfg: KeyServerConfig, migrate: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp drains in-flight requests on shutdown).

    The process is made non-dumpable with no core files first, like the agent: it holds the master
    key (or its vault token), the lease-signing key and every data key it releases."""
    harden_process()
    if not (cfg.tls_cert and cfg.tls_key):
        raise UsageError(f"{cfg.path}: [server] needs tls_cert and tls_key (the key service only speaks TLS)")
    if not cfg.admin_token_sha256:
        logging.getLogger("modelseal.keyserver").warning("no [admin] token_sha256: the admin API is disabled")
    ssl_context = pki.server_context(cfg.tls_cert, cfg.tls_key, str(cfg.client_ca) if cfg.client_ca else None)
    service = build_service(cfg, migrate)
    app = build_app(service, cfg.admin_token_sha256, cfg.max_body_bytes)
    web.run_app(
        app,
        sock=listen(cfg),
        ssl_context=ssl_context,
        access_log=None,
        print=lambda _msg: logging.getLogger("modelseal.keyserver").info(
            "key service on https://%s:%d (%s, master key: %s)", cfg.host, cfg.port,
            service.store.describe(), service.master.describe(),
        ),
        shutdown_timeout=10,
    )  # fmt: skip


def listen(cfg: KeyServerConfig) -> socket.socket:
    """Bind the listening socket here, so a taken port is one clear error naming it (not a traceback)."""
    return bind_tcp(f"{cfg.host}:{cfg.port}", "the key service", f"change [server] listen in {cfg.path}")
