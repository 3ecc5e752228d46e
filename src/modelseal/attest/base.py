"""The verifier interface the key service calls for every piece of evidence a host presents.

A verifier checks one kind of evidence (``mtls``, ``tpm``, ``sgx``, ``tdx``, ``sev-snp``...) and returns
:class:`Claims` it has *proven*; anything it cannot prove raises :class:`EvidenceError` naming what
failed. Evidence must carry the exchange's binding (see :mod:`modelseal.keyserver.protocol`) in its
report data; the verifier checks that, so evidence replayed from another exchange is refused. A grant's
requirements are matched against the claims by :func:`unmet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from modelseal.errors import ModelsealError
from modelseal.pki import PeerIdentity


class EvidenceError(ModelsealError):
    """Evidence is missing, malformed, not genuine, or not bound to this exchange."""


@dataclass(frozen=True)
class VerificationContext:
    peer: PeerIdentity
    binding: bytes
    nonce: bytes
    now: int


@dataclass
class Claims:
    kind: str
    measurements: dict[str, str] = field(default_factory=dict)
    report_data_bound: bool = False
    tcb_status: str | None = None
    debug: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "measurements": self.measurements,
            "report_data_bound": self.report_data_bound,
            "tcb_status": self.tcb_status,
            "debug": self.debug,
            **({"details": self.details} if self.details else {}),
        }


class Verifier(Protocol):
    kind: str

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims: ...


_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(verifier: Verifier) -> None:
    _VERIFIERS[verifier.kind] = verifier


def get_verifier(kind: str) -> Verifier | None:
    return _VERIFIERS.get(kind)


def known_kinds() -> list[str]:
    return sorted(_VERIFIERS)


def unmet(requirement: dict[str, Any], claims: Claims) -> str | None:
    """Why ``claims`` do not meet one grant requirement, or None if they do.

    A requirement is ``{"kind": K, "measurements": {NAME: VALUE or [VALUES]}, "allow_debug": bool,
    "tcb_status": [ALLOWED...]}``; everything but ``kind`` is optional.
    """
    for name, allowed in (requirement.get("measurements") or {}).items():
        allowed_values = [allowed] if isinstance(allowed, str) else list(allowed)
        got = claims.measurements.get(name)
        if got is None:
            return f"{claims.kind} evidence has no measurement {name!r}"
        if got.lower() not in (a.lower() for a in allowed_values):
            return f"{claims.kind} measurement {name} = {got} is not one the grant allows"
    if claims.debug and not requirement.get("allow_debug", False):
        return f"{claims.kind} evidence comes from a debug-mode TEE, which the grant forbids"
    allowed_tcb = requirement.get("tcb_status")
    if allowed_tcb and claims.tcb_status not in allowed_tcb:
        return f"{claims.kind} TCB status {claims.tcb_status} is not one of {', '.join(allowed_tcb)}"
    return None
