"""Real key services and agents for tests: subprocesses on loopback with real TLS certificates."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from modelseal import pki
from modelseal.keyserver.config import init_state
from modelseal.keyserver.sqlstore import db
from modelseal.release.client import AdminClient

PG_BASE = os.environ.get("MODELSEAL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            if port < 65535 and s.connect_ex(("127.0.0.1", port + 1)) != 0:
                try:
                    s2 = socket.socket()
                    s2.bind(("127.0.0.1", port + 1))
                    s2.close()
                    return port
                except OSError:
                    continue
    raise AssertionError("no two consecutive free ports")


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class PostgresSchema:
    """A private schema in the shared ``test`` database, dropped afterwards."""

    def __init__(self) -> None:
        import sqlalchemy

        self.name = f"ms_{secrets.token_hex(6)}"
        self._engine = sqlalchemy.create_engine(db.normalise_url(PG_BASE), isolation_level="AUTOCOMMIT")
        with self._engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {self.name}")
        self.url = f"{PG_BASE}?options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with self._engine.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {self.name} CASCADE")
        self._engine.dispose()


class KeyServer:
    """``modelseal keyserver run`` in a subprocess, with its own state directory and CA."""

    def __init__(self, directory: Path, database: str | None, leases: dict[str, int] | None = None,
                 transit: dict[str, str] | None = None) -> None:  # fmt: skip
        self.dir = directory
        self.port = free_port()
        self.info = init_state(directory, database=database, listen=f"127.0.0.1:{self.port}", transit=transit)
        self.config = Path(self.info["config"])
        if leases:
            text = self.config.read_text()
            for key, value in leases.items():
                text = re.sub(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.M)
            self.config.write_text(text)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = self.info["ca"]
        self.token = Path(self.info["admin_token_file"]).read_text().strip()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "keyserver.log"

    def start(self) -> KeyServer:
        env = {**os.environ}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelseal", "keyserver", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        wait_for(self.healthy, 30, f"key service on {self.url} (log: {self.log.read_text()[-2000:]})")
        return self

    def __enter__(self) -> KeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"key service exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/v1/health", verify=pki.client_context(self.ca), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def admin(self) -> AdminClient:
        return AdminClient(self.url, token=self.token, ca=self.ca)

    def admin_env(self) -> dict[str, str]:
        return {
            "MODELSEAL_KEYSERVER_URL": self.url,
            "MODELSEAL_KEYSERVER_CA": self.ca,
            "MODELSEAL_ADMIN_TOKEN": self.token,
        }

    def host_cert(self, name: str, uri: str | None = None) -> tuple[str, str]:
        cert, key = pki.issue(self.dir / "pki", name, uris=[uri] if uri else [])
        return str(cert), str(key)

    def host_client(self, cert: tuple[str, str] | None, **kwargs: Any) -> httpx.Client:
        ctx = pki.client_context(self.ca, *(cert or (None, None)))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=10, **kwargs)


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


class SoftwareTpm:
    """A real TPM 2.0 simulator (Debian's ``swtpm``) on loopback, driven by ``tpm2-tools``.

    CI installs both (scripts/test.sh); elsewhere tests that need them skip, unless $CI is set."""

    def __init__(self, directory: Path) -> None:
        import shutil

        import pytest

        missing = [t for t in ("swtpm", "tpm2_quote", "tpm2_createak") if shutil.which(t) is None]
        if missing:
            message = f"needs swtpm and tpm2-tools (missing: {', '.join(missing)}; apt install swtpm tpm2-tools)"
            if os.environ.get("CI"):
                raise AssertionError(message)
            pytest.skip(message)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()  # the swtpm TCTI talks to PORT (commands) and PORT+1 (control)
        self.ctrl = self.port + 1
        self.tcti = f"swtpm:host=127.0.0.1,port={self.port}"
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.dir}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.ctrl},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._listening, 10, "swtpm to listen")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def tool(self, *args: str) -> str:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        return subprocess.run(list(args), env=env, check=True, capture_output=True, text=True).stdout

    def extend(self, pcr: int, data: bytes = b"something else booted") -> None:
        import hashlib

        self.tool("tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> SoftwareTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Agent:
    """``modelseal agent run`` in a subprocess for one host certificate."""

    def __init__(
        self,
        server: KeyServer,
        cert: tuple[str, str],
        directory: Path,
        tables: dict[str, dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        self.socket = str(directory / f"agent-{secrets.token_hex(3)}.sock")
        self.config = directory / f"agent-{secrets.token_hex(3)}.toml"
        lines = [
            f'keyserver = "{server.url}"', f'ca = "{server.ca}"', f'cert = "{cert[0]}"', f'key = "{cert[1]}"',
            f'socket = "{self.socket}"', f'lease_public_key = "{server.info["lease_public_key"]}"',
        ]  # fmt: skip
        for key, value in extra.items():
            lines.append(f"{key} = {toml_value(value)}")
        for table, values in (tables or {}).items():
            lines += [f"[{table}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / f"{self.config.stem}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelseal", "agent", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(lambda: os.path.exists(self.socket), 20, f"agent socket (log: {self.log})")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
