"""Run the key service: harden the process, open its store, check its schema, load the keys, serve HTTPS."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import socket

from aiohttp import web
from cryptography import x509

from modelseal import pki
from modelseal.attest import Verifier, verifiers_from_config
from modelseal.errors import UsageError, one_line
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


def run(cfg: KeyServerConfig, migrate: bool = True, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp drains in-flight requests on shutdown).

    The process is made non-dumpable with no core files first, like the agent: it holds the master
    key (or its vault token), the lease-signing key and every data key it releases. With ``workers`` > 1
    the schema is migrated once, the socket bound once, and that many processes are forked to accept on
    it, each with its own service and database connections (decisions stay one at a time through the
    database's audit-head lock; challenges need no write, see :mod:`modelseal.keyserver.challenges`)."""
    harden_process()
    if not (cfg.tls_cert and cfg.tls_key):
        raise UsageError(f"{cfg.path}: [server] needs tls_cert and tls_key (the key service only speaks TLS)")
    if not cfg.admin_token_sha256:
        logging.getLogger("modelseal.keyserver").warning("no [admin] token_sha256: the admin API is disabled")
    if not 1 <= workers <= 64:
        raise UsageError("--workers must be 1 to 64")
    verifiers(cfg)  # a bad [attestation] table stops start-up here, before any worker
    if workers > 1 and cfg.database.startswith("sqlite"):
        raise UsageError(f"{cfg.path}: --workers needs PostgreSQL (SQLite lets one writer at a time; use one worker)")
    if workers > 1:
        open_store(cfg.database, migrate).close()
        migrate = False
    sock = listen(cfg)
    if workers == 1:
        serve(cfg, sock, migrate)
        return
    supervise(cfg, sock, workers)


def serve(cfg: KeyServerConfig, sock: socket.socket, migrate: bool, worker: bool = False) -> None:
    """One process serving HTTPS on ``sock`` until SIGINT/SIGTERM (``worker``: one of several)."""
    assert cfg.tls_cert and cfg.tls_key  # run() refused a config without them
    ssl_context = pki.server_context(cfg.tls_cert, cfg.tls_key, str(cfg.client_ca) if cfg.client_ca else None)
    service = build_service(cfg, migrate)
    app = build_app(service, cfg.admin_token_sha256, cfg.max_body_bytes)
    web.run_app(
        app,
        sock=sock,
        ssl_context=ssl_context,
        access_log=None,
        print=lambda _msg: logging.getLogger("modelseal.keyserver").info(
            "key service on %s (%s, master key: %s%s)", public_url(cfg),
            service.store.describe(), service.master.describe(), f", worker pid {os.getpid()}" if worker else "",
        ),
        shutdown_timeout=10,
    )  # fmt: skip


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (Linux PR_SET_PDEATHSIG), so a
    killed supervisor leaves no worker releasing keys on its own; exit now if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)


def supervise(cfg: KeyServerConfig, sock: socket.socket, workers: int) -> None:
    """Fork ``workers`` processes serving ``sock``; pass SIGINT/SIGTERM on to them and wait. A worker that
    dies stops the others and the whole service with an error: a supervisor (systemd, Kubernetes) restarts
    it, rather than this process running on at part strength unnoticed."""
    log = logging.getLogger("modelseal.keyserver")
    children: list[int] = []
    parent = os.getpid()
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # none is lost (or kills the parent) between forks
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                _die_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                serve(cfg, sock, migrate=False, worker=True)
                code = 0
            except BaseException as exc:  # a worker reports in one line and exits; the parent decides
                log.error("key-service worker %d failed: %s", os.getpid(), one_line(exc))
            finally:
                os._exit(code)
        children.append(pid)
    sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a stop that came during the forks is forwarded now
    log.info("key service: %d workers (pids %s)", workers, ", ".join(map(str, children)))
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid in children:
            children.remove(pid)
        if os.waitstatus_to_exitcode(status) != 0 and children and not failed:
            failed = True
            code = os.waitstatus_to_exitcode(status)
            log.error("key-service worker %d exited with %d: stopping the others", pid, code)
            forward(signal.SIGTERM, None)
    if failed:
        raise UsageError("a key-service worker failed (see the log above)")


def public_url(cfg: KeyServerConfig) -> str:
    """The URL clients should use: ``https://NAME:PORT`` with a NAME the server certificate covers.

    The listen address when the certificate names it (the default: 127.0.0.1), else the certificate's first
    DNS name or IP address: ``init --server-name localhost`` listens on 127.0.0.1, which a client checking
    the certificate would refuse. Without a readable certificate or names, the listen address.
    """
    try:
        cert = x509.load_pem_x509_certificate(cfg.tls_cert.read_bytes()) if cfg.tls_cert else None
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) if cert else []
    except (OSError, ValueError, x509.InvalidVersion, x509.ExtensionNotFound):
        names = []
    covered = [str(n.value) for n in names if isinstance(n, (x509.DNSName, x509.IPAddress))]
    covered = [n for n in covered if not n.startswith("*")]  # a wildcard names no host to print
    host = cfg.host if _canonical(cfg.host) in {_canonical(n) for n in covered} or not covered else covered[0]
    return f"https://[{host}]:{cfg.port}" if ":" in host else f"https://{host}:{cfg.port}"


def _canonical(name: str) -> str:
    """An IP address in one spelling (``::1`` for ``0:0::1``), a DNS name in lower case."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def listen(cfg: KeyServerConfig) -> socket.socket:
    """Bind the listening socket here, so a taken port is one clear error naming it (not a traceback)."""
    return bind_tcp(f"{cfg.host}:{cfg.port}", "the key service", f"change [server] listen in {cfg.path}")
