"""Run the key service: open the database, check its schema, load the keys, serve HTTPS."""

from __future__ import annotations

import logging

from aiohttp import web

from modelseal import pki
from modelseal.attest.verifiers import load_verifiers
from modelseal.errors import UsageError
from modelseal.keyserver import db
from modelseal.keyserver.app import build_app
from modelseal.keyserver.config import KeyServerConfig
from modelseal.keyserver.service import KeyService


def build_service(cfg: KeyServerConfig, migrate: bool = True) -> KeyService:
    load_verifiers(cfg.attestation, cfg.path.parent)
    engine = db.connect(cfg.database)
    if migrate:
        db.migrate(engine)
    db.check_current(engine)
    return KeyService(engine, cfg.master_key(), cfg.signer(), cfg.settings)


def run(cfg: KeyServerConfig, migrate: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp drains in-flight requests on shutdown)."""
    if not (cfg.tls_cert and cfg.tls_key):
        raise UsageError(f"{cfg.path}: [server] needs tls_cert and tls_key (the key service only speaks TLS)")
    if not cfg.admin_token_sha256:
        logging.getLogger("modelseal.keyserver").warning("no [admin] token_sha256: the admin API is disabled")
    ssl_context = pki.server_context(cfg.tls_cert, cfg.tls_key, str(cfg.client_ca) if cfg.client_ca else None)
    service = build_service(cfg, migrate)
    app = build_app(service, cfg.admin_token_sha256, cfg.max_body_bytes)
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        ssl_context=ssl_context,
        access_log=None,
        print=lambda _msg: logging.getLogger("modelseal.keyserver").info(
            "key service on https://%s:%d (%s, master key: %s)", cfg.host, cfg.port,
            db.normalise_url(cfg.database).split("://")[0], service.master.describe(),
        ),
        shutdown_timeout=10,
    )  # fmt: skip
