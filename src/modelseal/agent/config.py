"""The agent's configuration file (TOML); relative paths resolve against the file's directory.

```toml
keyserver = "https://keys.example:8443"
ca = "ca.pem"                     # the key service's CA
cert = "host-a.pem"               # this host's client certificate and key
key = "host-a.key"
socket = "/run/modelseal/agent.sock"
socket_mode = "0600"
lease_public_key = "ed25519:..."  # pin the service's lease-signing key (recommended)
evidence = ["mtls"]               # kinds to present: mtls, tpm, tdx, sev-snp, sgx, nvidia-gpu; "none" = TLS only
prefetch = true                   # fetch every granted key at start
max_grace_s = 3600                # cap on the owner's outage grace
retry_s = 5                       # retry interval while the key service is unreachable
usage_log = "/var/lib/modelseal/usage.log"   # the signed usage log (needed for metered grants; persistent disk)

admin_user = "ops"                # besides root and the agent's own user: may ask for status, uses the reserve

[acl]                             # local uids allowed per model ("*" = any model); root always
"*" = [1000]

[limits]                          # the local socket (defaults shown)
max_connections = 512             # open connections in all
max_connections_per_uid = 64      # per local uid other than root, the agent's user and admin_user
reserved_connections = 32         # of max_connections, kept for root, the agent's user and admin_user
request_timeout_s = 5             # a request line must arrive within this; slow or idle clients are cut off

[tpm]                             # for evidence "tpm" (enrol first: `modelseal agent tpm-enroll`)
tcti = "device:/dev/tpmrm0"       # or "swtpm:host=127.0.0.1,port=2321"
ak_handle = "0x81010002"
pcrs = "sha256:0,1,2,3,4,5,6,7"

[tsm]                             # for "tdx" / "sev-snp" (configfs-tsm in a confidential VM)
pccs_url = "https://pccs.example:8081"   # TDX collateral
# vcek = "vcek.der"; cert_chain = "ask_ark.pem"   # SNP, when the host gives no certificate table

[sgx]                             # for "sgx" (Gramine /dev/attestation)
pccs_url = "https://pccs.example:8081"
```

The ``[tpm]``, ``[tsm]`` and ``[sgx]`` tables belong to the attestation kinds whose collectors read them
(:mod:`modelseal.attest.registry`); a kind from another package brings its own table the same way.

A key this module does not know (a typo such as ``lease_publickey``) is an error naming the key and
the file: a misspelt pin or limit would otherwise be silently ignored.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.agent.daemon import Acl
from modelseal.agent.listener import Limits
from modelseal.agent.release import ReleaseClient
from modelseal.agent.usagelog import UsageLog
from modelseal.attest import collectors_from_config
from modelseal.attest.registry import agent_tables
from modelseal.errors import UsageError
from modelseal.pki import identity_of_cert_file

REQUIRED = ("keyserver", "ca", "cert", "key", "socket")
AGENT_OPTIONAL = (
    "socket_mode", "lease_public_key", "evidence", "prefetch", "max_grace_s", "retry_s", "admin_user",
    "acl", "limits", "usage_log",
)  # fmt: skip
AGENT_TABLES: dict[str, tuple[str, ...] | None] = {  # the keys each table may hold; None: any key
    "acl": None,  # keyed by model name
    "limits": ("max_connections", "max_connections_per_uid", "reserved_connections", "request_timeout_s"),
}
LEASE_KEY_COMMAND = "modelseal keyserver lease-key"


@dataclass
class AgentConfig:
    keyserver: str
    ca: Path
    cert: Path
    key: Path
    socket: str
    socket_mode: int = 0o600
    lease_public_key: str | None = None
    evidence: list[str] = field(default_factory=lambda: ["mtls"])
    prefetch: bool = True
    max_grace_s: int | None = None
    retry_s: float = 5
    acl: Acl = field(default_factory=Acl)
    limits: Limits = field(default_factory=Limits)
    usage_log: Path | None = None
    evidence_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentConfig:
        path = Path(path)
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read agent config {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}") from None
        try:
            return cls._from_table(path, data)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: bad value: {exc}") from None

    @classmethod
    def _from_table(cls, path: Path, data: dict[str, Any]) -> AgentConfig:
        evidence_tables = _evidence_tables()
        _check_keys(data, evidence_tables)
        base = path.parent
        tables = {name: data.get(name, {}) for name in AGENT_TABLES}
        rules = {model: [_uid(u) for u in _list(f"acl.{model}", users)] for model, users in tables["acl"].items()}
        admin, pinned = data.get("admin_user"), "lease_public_key" in data
        return cls(
            keyserver=_text("keyserver", data["keyserver"]),
            ca=base / _text("ca", data["ca"]),
            cert=base / _text("cert", data["cert"]),
            key=base / _text("key", data["key"]),
            socket=str(base / _text("socket", data["socket"])),
            socket_mode=int(str(data.get("socket_mode", "0600")), 8),
            lease_public_key=_text("lease_public_key", data["lease_public_key"]) if pinned else None,
            evidence=[str(kind) for kind in _list("evidence", data.get("evidence", ["mtls"]))],
            prefetch=_flag("prefetch", data.get("prefetch", True)),
            max_grace_s=data.get("max_grace_s"),
            retry_s=float(data.get("retry_s", 5)),
            acl=Acl(rules) if rules else Acl(),
            limits=_limits(tables["limits"], None if admin is None else _uid(admin)),
            usage_log=base / _text("usage_log", data["usage_log"]) if "usage_log" in data else None,
            evidence_settings={k: dict(data[k]) for k in evidence_tables if k in data},
            path=path,
        )

    def warnings(self) -> list[str]:
        """What an operator should fix although the agent can run (logged at start)."""
        if self.lease_public_key:
            return []
        return [
            f"lease_public_key is not pinned in {self.path}: the agent will trust whatever lease-signing key the "
            f"key service presents over TLS; pin it (`{LEASE_KEY_COMMAND}` on the key service prints it)"
        ]

    def open_usage_log(self) -> UsageLog | None:
        """The usage log (verified, or created with its opening entry); None when none is configured."""
        if self.usage_log is None:
            return None
        return UsageLog.open(self.usage_log, self.key, identity_of_cert_file(self.cert).spki)

    def client(self) -> ReleaseClient:
        return ReleaseClient(
            self.keyserver,
            ca=self.ca,
            cert=str(self.cert),
            key=str(self.key),
            service_key=self.lease_public_key,
            evidence=self.evidence,
            collectors=collectors_from_config(self.evidence, self.evidence_settings),
        )


def _evidence_tables() -> dict[str, tuple[str, ...]]:
    """The tables the attestation kinds' collectors read (``[tpm]``, ``[tsm]``, ``[sgx]``, and any a kind
    from another package brings), each with the keys it may hold."""
    tables = agent_tables()
    for name in tables:
        if name in REQUIRED or name in AGENT_OPTIONAL:
            raise UsageError(f"an attestation kind claims the agent config table [{name}], which the agent uses itself")
    return tables


def _check_keys(data: dict[str, Any], evidence_tables: dict[str, tuple[str, ...]] | None = None) -> None:
    """Unknown and missing keys are errors naming the key and the file."""
    if evidence_tables is None:
        evidence_tables = _evidence_tables()
    optional = AGENT_OPTIONAL + tuple(evidence_tables)
    for name in data:
        if name not in REQUIRED and name not in optional:
            raise UsageError(f"unknown key {name!r} (known: {', '.join(REQUIRED + optional)})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    for table, known in {**AGENT_TABLES, **evidence_tables}.items():
        value = data.get(table, {})
        if not isinstance(value, dict):
            raise UsageError(f"{table} must be a table ([{table}])")
        for name in value:
            if known is not None and name not in known:
                raise UsageError(f"unknown key {name!r} in [{table}] (known: {', '.join(known)})")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string")
    return value


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise UsageError(f"{name} must be a list")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false")
    return value


def _limits(table: dict[str, Any], admin_uid: int | None) -> Limits:
    """The [limits] table: whole numbers of connections, a positive number of seconds."""
    values: dict[str, Any] = {}
    for name, value in table.items():
        number = isinstance(value, int) if name != "request_timeout_s" else isinstance(value, int | float)
        if not number or isinstance(value, bool):
            raise UsageError(f"[limits] {name} must be a number")
        values[name] = value
    return Limits(**values, admin_uid=admin_uid)


def _uid(user: int | str) -> int:
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"no local user {user!r} (named in the ACL or admin_user)") from None
