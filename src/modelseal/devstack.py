"""The whole stack as real processes on loopback: key service, host agent, ``modelseal serve``.

``modelseal demo``, the real-process tests and the benchmarks all start the same three programs the way an
operator does (``python -m modelseal ...``, real TLS, a state directory, a config file) and need the same
three things from a harness: a free port, a wait until the program says it is ready, and a stop that does
not leave a process behind. This module is that harness, written once.

Each process writes its output to a log file. One that exits before it is ready, or is not ready in time,
raises :class:`StackError`: one line naming the program, its exit status, the log's last line and the log
file (what ``modelseal demo`` prints), with the log's tail attached as an exception note (what a failing
test shows). Readiness only looks at what the log gained since this start, so a log reused across runs
(the demo's work directory) cannot report a previous run as ready.

Nothing here imports click (only ``modelseal.cli`` does), and nothing here is needed to seal or load a
model: the key service, agent and serve extras are imported when a process of theirs is set up.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from modelseal import pki
from modelseal.errors import MissingDependencyError, ModelsealError

if TYPE_CHECKING:
    import httpx

    from modelseal.release.client import AdminClient

LOOPBACK = "127.0.0.1"
POSTGRES_ENV = "MODELSEAL_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


class StackError(ModelsealError):
    """A process of the stack exited before it was ready, or a wait ran out of time."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the kernel's pick; racy only against others)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A free port whose successor is free too (swtpm listens on PORT for commands, PORT+1 for control)."""
    for _ in range(100):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port + 1))
            except OSError:
                continue
        return port
    raise StackError("no two consecutive free ports on loopback")


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    """Poll ``predicate`` every 50 ms until it is true; :class:`StackError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (strings, booleans, numbers and lists of them: what configs here hold)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


class ModelsealProcess(ABC):
    """One ``python -m modelseal ARGS`` child with stdout and stderr appended to ``log``.

    Subclasses say what to run (:meth:`command`) and when it is ready (:meth:`ready`); ``start`` waits for
    that, ``stop`` ends it, and ``with`` does both.
    """

    what = "modelseal"
    ready_timeout = 30.0

    def __init__(self, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.log = Path(log)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    @abstractmethod
    def command(self) -> list[str]:
        """The arguments after ``python -m modelseal``."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether the program is ready; it runs (see :meth:`running`) while this is asked."""

    def start(self) -> Self:
        """Start the program and return once it is ready; stop it and raise :class:`StackError` if it is not."""
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelseal", *self.command()],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        try:
            wait_for(lambda: self.running() and self.ready(), self.ready_timeout, f"the {self.what} (log: {self.log})")
        except StackError as exc:
            self.stop()
            exc.add_note(self.log_since_start()[-3000:])
            raise
        return self

    def running(self) -> bool:
        """True while the process runs; :class:`StackError` (naming the log's last line) once it has exited."""
        if self.proc is None:
            raise StackError(f"the {self.what} was not started")
        if self.proc.poll() is None:
            return True
        text = self.log_since_start()
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
        error = StackError(f"the {self.what} exited with status {self.proc.returncode}: {last} (log: {self.log})")
        error.add_note(text[-3000:])
        raise error

    def log_since_start(self) -> str:
        """What the program wrote to its log since the last ``start``."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_from)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout`` s); the exit status, None if never run."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class KeyServer(ModelsealProcess):
    """``modelseal keyserver run`` on a free loopback port, with its own state directory, CA and admin token.

    ``leases`` overrides numbers in the config's [leases] table (``{"renew_after_s": 1}`` makes a revocation
    show within seconds); ``transit`` keeps the master key in OpenBao/Vault transit, as ``init --transit-url``.
    """

    what = "key service"

    def __init__(
        self,
        directory: Path,
        database: str | None = None,
        leases: Mapping[str, int] | None = None,
        transit: dict[str, str] | None = None,
        *,
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        from modelseal.keyserver.config import init_state

        super().__init__(Path(directory) / "keyserver.log")
        self.dir = Path(directory)
        self.workers = workers
        self.port = port or free_port()
        self.info = init_state(directory, database=database, listen=f"{LOOPBACK}:{self.port}", transit=transit)
        self.config = Path(self.info["config"])
        if leases:
            text = self.config.read_text()
            for key, value in leases.items():
                text = re.sub(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.M)
            self.config.write_text(text)
        self.url = f"https://{LOOPBACK}:{self.port}"
        self.ca: str = self.info["ca"]
        self.token = Path(self.info["admin_token_file"]).read_text().strip()

    def command(self) -> list[str]:
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        return ["keyserver", "run", "--config", str(self.config), *workers]

    def ready(self) -> bool:
        return self.healthy()

    def healthy(self) -> bool:
        """``GET /v1/health`` answers 200 (over TLS checked against the service's CA)."""
        import httpx

        self.running()
        try:
            return httpx.get(f"{self.url}/v1/health", verify=pki.client_context(self.ca), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def admin(self) -> AdminClient:
        """An admin-API client holding the admin token."""
        from modelseal.release.client import AdminClient

        return AdminClient(self.url, token=self.token, ca=self.ca)

    def admin_env(self) -> dict[str, str]:
        """The variables ``modelseal keyserver model|grant|...`` read to reach this service."""
        return {
            "MODELSEAL_KEYSERVER_URL": self.url,
            "MODELSEAL_KEYSERVER_CA": self.ca,
            "MODELSEAL_ADMIN_TOKEN": self.token,
        }

    def issue(self, name: str, *, uris: Sequence[str] = (), server_names: Sequence[str] = ()) -> tuple[str, str]:
        """(certificate, key) paths signed by this service's CA: a host's client certificate, or with
        ``server_names`` a server certificate (for ``modelseal serve`` on the same private CA)."""
        cert, key = pki.issue(self.dir / "pki", name, uris=list(uris), server_names=list(server_names))
        return str(cert), str(key)

    def host_cert(self, name: str, uri: str | None = None) -> tuple[str, str]:
        """A host's client certificate; ``uri`` adds a URI SAN (a grant may name it instead of the key)."""
        return self.issue(name, uris=[uri] if uri else [])

    def host_client(self, cert: tuple[str, str] | None, **kwargs: Any) -> httpx.Client:
        """An HTTP client for the host API, presenting ``cert`` (None: no client certificate)."""
        import httpx

        ctx = pki.client_context(self.ca, *(cert or (None, None)))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=10, **kwargs)


class Agent(ModelsealProcess):
    """``modelseal agent run`` for one host certificate, talking to ``server``; ready when its socket exists.

    Extra keyword arguments become top-level config keys (``prefetch=False``, ``socket_mode="0666"``) and
    ``tables`` whole tables (``{"limits": {...}}``). ``name`` names the config, log and (by default)
    socket in ``directory``; pass ``socket`` when ``directory`` is deep (a unix socket path has 108 bytes).
    """

    what = "agent"
    ready_timeout = 20.0

    def __init__(
        self,
        server: KeyServer,
        cert: tuple[str, str],
        directory: Path,
        tables: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        name: str | None = None,
        socket: str | Path | None = None,
        **extra: Any,
    ) -> None:
        name = name or f"agent-{secrets.token_hex(3)}"
        super().__init__(Path(directory) / f"{name}.log")
        self.socket = str(socket or Path(directory) / f"{name}.sock")
        self.config = Path(directory) / f"{name}.toml"
        lines = [
            f'keyserver = "{server.url}"', f'ca = "{server.ca}"', f'cert = "{cert[0]}"', f'key = "{cert[1]}"',
            f'socket = "{self.socket}"', f'lease_public_key = "{server.info["lease_public_key"]}"',
            *(f"{key} = {toml_value(value)}" for key, value in extra.items()),
        ]  # fmt: skip
        for table, values in (tables or {}).items():
            lines += [f"[{table}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
        self.config.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return ["agent", "run", "--config", str(self.config)]

    def ready(self) -> bool:
        return os.path.exists(self.socket)  # the agent renames its socket into place once it listens


class Serve(ModelsealProcess):
    """``modelseal serve`` for ``repository`` on two free loopback ports; ready when it logs "server ready"
    (after it has listened and loaded every model it could).

    ``tls`` is the server's (certificate, key); ``client_ca`` turns on mTLS; ``args`` go on the command line
    as they are (``["-i", "agent:/run/a.sock", "--key-check", "0.5"]``).
    """

    what = "inference server"
    ready_timeout = 90.0

    def __init__(
        self,
        repository: Path,
        log: Path,
        *,
        args: Sequence[str] = (),
        tls: tuple[str, str] | None = None,
        client_ca: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(log, env)
        self.repository = Path(repository)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http, self.grpc = f"{LOOPBACK}:{self.http_port}", f"{LOOPBACK}:{self.grpc_port}"
        self.base_url = f"{'https' if tls else 'http'}://{self.http}"
        self.args = list(args)
        if tls:
            self.args += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        if client_ca:
            self.args += ["--client-ca", client_ca]

    def command(self) -> list[str]:
        return ["serve", "--repository", str(self.repository), "--http", self.http, "--grpc", self.grpc, *self.args]

    def ready(self) -> bool:
        return "server ready" in self.log_since_start()


class SoftwareTpm:
    """A TPM 2.0 simulator (``swtpm``) on loopback, driven with ``tpm2-tools`` through :attr:`tcti`.

    :class:`MissingDependencyError` when the tools are not installed (``apt install swtpm tpm2-tools``).
    """

    TOOLS = ("swtpm", "tpm2_quote", "tpm2_createak")

    @classmethod
    def missing(cls) -> list[str]:
        """The tools this needs that are not on PATH."""
        return [tool for tool in cls.TOOLS if shutil.which(tool) is None]

    def __init__(self, directory: Path) -> None:
        if missing := self.missing():
            raise MissingDependencyError(
                f"needs swtpm and tpm2-tools (missing: {', '.join(missing)}; apt install swtpm tpm2-tools)"
            )
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()
        self.ctrl = self.port + 1
        self.tcti = f"swtpm:host={LOOPBACK},port={self.port}"
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.dir}",
             "--server", f"type=tcp,port={self.port},bindaddr={LOOPBACK}",
             "--ctrl", f"type=tcp,port={self.ctrl},bindaddr={LOOPBACK}", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(self._listening, 10, "swtpm to listen")
        except StackError:
            self.stop()
            raise

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((LOOPBACK, self.port)) == 0

    def tool(self, *args: str) -> str:
        """Run a tpm2-tools command against this TPM; its stdout."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        return subprocess.run(list(args), env=env, check=True, capture_output=True, text=True).stdout

    def extend(self, pcr: int, data: bytes = b"something else booted") -> None:
        """Extend PCR ``pcr`` (sha256 bank) with the hash of ``data``: the host now measures differently."""
        import hashlib

        self.tool("tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def postgres_url() -> str:
    """The PostgreSQL database the tests and benchmarks use: ``$MODELSEAL_TEST_POSTGRES`` or a local default."""
    return os.environ.get(POSTGRES_ENV, POSTGRES_DEFAULT)


class PostgresSchema:
    """A private schema in a shared PostgreSQL database (:func:`postgres_url`), dropped by :meth:`drop`;
    :attr:`url` points a key service at it."""

    def __init__(self, base: str | None = None) -> None:
        import sqlalchemy

        from modelseal.keyserver.sqlstore import db

        base = base or postgres_url()
        self.name = f"ms_{secrets.token_hex(6)}"
        self._engine = sqlalchemy.create_engine(db.normalise_url(base), isolation_level="AUTOCOMMIT")
        with self._engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {self.name}")
        self.url = f"{base}?options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with self._engine.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {self.name} CASCADE")
        self._engine.dispose()
