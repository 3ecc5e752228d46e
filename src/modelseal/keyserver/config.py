"""The key service's configuration file (TOML) and the state directory ``modelseal keyserver init`` makes.

Relative paths in the file are resolved against the file's directory. Secrets never live in the
file itself: it names key files (0600) and environment variables (the transit token). Unknown tables
and keys are errors naming the file, so a misspelt setting never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelseal import atomicfile, pki
from modelseal.errors import KeyFileError, UsageError
from modelseal.keyfile import key_lines, read_text, write_secret
from modelseal.keyserver.masterkey import LocalMasterKey, MasterKey, TransitMasterKey
from modelseal.keyserver.refusals import RefusalSettings
from modelseal.keyserver.service import ServiceSettings
from modelseal.release.protocol import service_public_key_text

SIGNING_LABEL = "MODELSEAL-LEASE-SIGNING-KEY"
CONFIG_NAME = "keyserver.toml"
MAX_BODY_LIMIT = 16 * 1024 * 1024  # the largest real body (a release with TEE evidence) is a few KiB
# Every table and key keyserver.toml may hold; [attestation] is checked by its verifiers.
KNOWN_KEYS: dict[str, frozenset[str] | None] = {
    "server": frozenset({"listen", "tls_cert", "tls_key", "client_ca", "max_body_bytes"}),
    "database": frozenset({"url"}),
    "master_key": frozenset({"backend", "path", "url", "token_env", "key", "mount"}),
    "signing": frozenset({"key"}),
    "admin": frozenset({"token_sha256"}),
    "leases": frozenset(ServiceSettings.__dataclass_fields__),
    "audit": frozenset(RefusalSettings.__dataclass_fields__),
    "attestation": None,
}


def check_keys(data: dict[str, Any], path: Path) -> None:
    """Refuse tables and keys this version does not know, naming the first and the file."""
    for table, value in data.items():
        if table not in KNOWN_KEYS:
            raise UsageError(f"{path}: unknown table [{table}] (known: {', '.join(sorted(KNOWN_KEYS))})")
        if not isinstance(value, dict):
            raise UsageError(f"{path}: {table} must be a table ([{table}]), not a single value")
        known = KNOWN_KEYS[table]
        unknown = sorted(set(value) - known) if known is not None else []
        if unknown:
            raise UsageError(
                f"{path}: unknown key {unknown[0]!r} in [{table}] (known: {', '.join(sorted(known or ()))})"
            )


@dataclass
class KeyServerConfig:
    path: Path
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    max_body_bytes: int = 64 * 1024
    database: str = "sqlite:///keyserver.db"
    master: dict[str, Any] = field(default_factory=lambda: {"backend": "local", "path": "master.key"})
    signing_key: Path | None = None
    admin_token_sha256: str = ""
    attestation: dict[str, Any] = field(default_factory=dict)
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    refusals: RefusalSettings = field(default_factory=RefusalSettings)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyServerConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read key-service config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}") from None
        check_keys(data, path)
        base = path.parent
        server, db, leases = data.get("server", {}), data.get("database", {}), data.get("leases", {})

        def rel(value: str | None) -> Path | None:
            return None if value is None else (base / value)

        host, _, port = str(server.get("listen", "127.0.0.1:8443")).rpartition(":")
        url = db.get("url", "sqlite:///keyserver.db")
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = f"sqlite:///{base / url.removeprefix('sqlite:///')}"
        try:
            settings = ServiceSettings(**{k: int(v) for k, v in leases.items()})
            refusals = RefusalSettings(**{k: int(v) for k, v in data.get("audit", {}).items()})
            port_number = int(port)
            max_body = int(server.get("max_body_bytes", 64 * 1024))
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"{path}: bad [server] listen or max_body_bytes, [leases] or [audit] value: {exc}"
            ) from None
        if not 1024 <= max_body <= MAX_BODY_LIMIT:
            raise UsageError(f"{path}: [server] max_body_bytes must be from 1024 to {MAX_BODY_LIMIT}")
        month = 86400 * 30
        limits = {"lease_ttl_s": month, "renew_after_s": 86400, "challenge_ttl_s": 3600, "default_grace_s": month}
        for name, top in limits.items():
            if not 1 <= getattr(settings, name) <= top:
                raise UsageError(f"{path}: [leases] {name} must be from 1 to {top}")
        if min(refusals.burst, refusals.max_peers, refusals.total_burst) < 0 or refusals.interval_s < 1:
            raise UsageError(f"{path}: [audit] values must be positive")
        return cls(
            path=path,
            host=host.strip("[]") or "127.0.0.1",
            port=port_number,
            tls_cert=rel(server.get("tls_cert")),
            tls_key=rel(server.get("tls_key")),
            client_ca=rel(server.get("client_ca")),
            max_body_bytes=max_body,
            database=url,
            master=dict(data.get("master_key", {"backend": "local", "path": "master.key"})),
            signing_key=rel(data.get("signing", {}).get("key", "lease-signing.key")),
            admin_token_sha256=str(data.get("admin", {}).get("token_sha256", "")),
            attestation=dict(data.get("attestation", {})),
            settings=settings,
            refusals=refusals,
        )

    def master_key(self) -> MasterKey:
        backend = self.master.get("backend", "local")
        if backend == "local":
            return LocalMasterKey(self.path.parent / self.master.get("path", "master.key"))
        if backend == "transit":
            token_env = self.master.get("token_env", "BAO_TOKEN")
            token = os.environ.get(token_env)
            if not token:
                raise UsageError(f"the transit master key needs a token in ${token_env}")
            return TransitMasterKey(
                self.master["url"], token, self.master.get("key", "modelseal"), self.master.get("mount", "transit")
            )
        raise UsageError(f"{self.path}: unknown master_key backend {backend!r} (local or transit)")

    def lease_public_key(self) -> str:
        """The lease-signing public key agents pin (``lease_public_key`` in agent.toml)."""
        return service_public_key_text(self.signer())

    def signer(self) -> ed25519.Ed25519PrivateKey:
        assert self.signing_key is not None
        for label, raw in key_lines(read_text(self.signing_key), str(self.signing_key)):
            if label == SIGNING_LABEL and len(raw) == 32:
                return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
        raise KeyFileError(f"{self.signing_key} holds no {SIGNING_LABEL} line")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def init_state(
    directory: str | os.PathLike[str],
    *,
    database: str | None = None,
    listen: str = "127.0.0.1:8443",
    server_names: list[str] | None = None,
    transit: dict[str, str] | None = None,
    renew_after_s: int = 60,
) -> dict[str, Any]:
    """Create a ready-to-run state directory: config, TLS (a small CA), master key, signing key, token.

    ``renew_after_s``: how often agents renew their leases, hence how soon a revocation reaches hosts
    (1 to 299 seconds; leases last 300).

    Returns what the operator needs next (paths, the admin token, the lease-signing public key).
    """
    if not 1 <= renew_after_s < 300:
        raise UsageError(f"--renew-after must be 1 to 299 seconds (leases last 300), not {renew_after_s}")
    out = Path(directory)
    if (out / CONFIG_NAME).exists():
        raise UsageError(f"{out / CONFIG_NAME} already exists; refusing to overwrite a key service")
    out.mkdir(parents=True, exist_ok=True)
    pki_dir = out / "pki"
    pki.init_ca(pki_dir)
    pki.issue(pki_dir, "keyserver", server_names=server_names or ["localhost", "127.0.0.1"])
    if transit:
        TransitMasterKey(
            transit["url"], os.environ.get(transit["token_env"], ""), transit.get("key", "modelseal")
        ).ensure()
        master_block = "\n".join(f'{k} = "{v}"' for k, v in {"backend": "transit", **transit}.items())
    else:
        LocalMasterKey.create(out / "master.key")
        master_block = 'backend = "local"\npath = "master.key"'
    signer = ed25519.Ed25519PrivateKey.generate()
    raw = signer.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    write_secret(out / "lease-signing.key", SIGNING_LABEL, raw, ["modelseal key-service lease-signing key"])
    token = secrets.token_urlsafe(32)
    atomicfile.write_bytes(out / "admin.token", (token + "\n").encode(), atomicfile.PRIVATE)
    db_url = database or "sqlite:///keyserver.db"
    config = (
        f"""# modelseal key service (docs/operations.md)
[server]
listen = "{listen}"
tls_cert = "pki/keyserver.pem"
tls_key = "pki/keyserver.key"
client_ca = "pki/ca.pem"
max_body_bytes = 65536

[database]
url = "{db_url}"

[master_key]
{master_block}

[signing]
key = "lease-signing.key"

[admin]
token_sha256 = "{token_hash(token)}"

[leases]
lease_ttl_s = 300
renew_after_s = {renew_after_s}
challenge_ttl_s = 60
default_grace_s = 600

[audit]
# past `burst` refusals per (event, code, peer) in an interval, the rest are counted into one entry
burst = 5
interval_s = 60
"""
    )
    atomicfile.write_bytes(out / CONFIG_NAME, config.encode(), atomicfile.default_mode())
    return {
        "config": str(out / CONFIG_NAME),
        "ca": str(pki_dir / pki.CA_CERT),
        "admin_token_file": str(out / "admin.token"),
        "lease_public_key": service_public_key_text(signer),
        "database": db_url,
    }
