"""The agent's configuration file (TOML); relative paths resolve against the file's directory.

```toml
keyserver = "https://keys.example:8443"
ca = "ca.pem"                     # the key service's CA
cert = "host-a.pem"               # this host's client certificate and key
key = "host-a.key"
socket = "/run/modelseal/agent.sock"
socket_mode = "0600"
lease_public_key = "ed25519:..."  # pin the service's lease-signing key (recommended)
evidence = ["mtls"]               # kinds to present: mtls, tpm, tdx, sev-snp, sgx; "none" = TLS identity only
prefetch = true                   # fetch every granted key at start
max_grace_s = 3600                # cap on the owner's outage grace
retry_s = 5                       # retry interval while the key service is unreachable

[acl]                             # local uids allowed per model ("*" = any model); root always
"*" = [1000]

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
"""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.agent.daemon import Acl
from modelseal.agent.evidence import build_collectors
from modelseal.agent.release import ReleaseClient
from modelseal.errors import UsageError


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
    evidence_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentConfig:
        path = Path(path)
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read agent config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}") from None
        missing = [k for k in ("keyserver", "ca", "cert", "key", "socket") if k not in data]
        if missing:
            raise UsageError(f"{path}: missing {', '.join(missing)}")
        base = path.parent
        rules = {model: [_uid(u) for u in users] for model, users in data.get("acl", {}).items()}
        try:
            return cls(
                keyserver=str(data["keyserver"]),
                ca=base / data["ca"],
                cert=base / data["cert"],
                key=base / data["key"],
                socket=str(base / data["socket"]),
                socket_mode=int(str(data.get("socket_mode", "0600")), 8),
                lease_public_key=data.get("lease_public_key"),
                evidence=list(data.get("evidence", ["mtls"])),
                prefetch=bool(data.get("prefetch", True)),
                max_grace_s=data.get("max_grace_s"),
                retry_s=float(data.get("retry_s", 5)),
                acl=Acl(rules) if rules else Acl(),
                evidence_settings={k: dict(data[k]) for k in ("tpm", "tsm", "sgx") if k in data},
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: bad value: {exc}") from None

    def client(self) -> ReleaseClient:
        return ReleaseClient(
            self.keyserver,
            ca=self.ca,
            cert=str(self.cert),
            key=str(self.key),
            service_key=self.lease_public_key,
            evidence=self.evidence,
            collectors=build_collectors(self.evidence, self.evidence_settings),
        )


def _uid(user: int | str) -> int:
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"agent ACL names unknown user {user!r}") from None
