"""The verifier interface the key service calls for every piece of evidence a host presents.

A verifier checks one kind of evidence (``mtls``, ``tpm``, ``sgx``, ``tdx``, ``sev-snp``) and returns
:class:`Claims` it has *proven*; anything it cannot prove raises :class:`EvidenceError` naming what
failed. Evidence must carry the exchange's binding (see :mod:`modelseal.release.protocol`) in its
report data; the verifier says whether it does (``report_data_bound``), so evidence replayed from another
exchange is refused. A grant's requirements are matched against the claims by :func:`unmet`.

The host-side half of a kind is its *collector*: given the exchange's binding, it produces the evidence
document that kind's verifier reads. A kind's verifier and collector live side by side in one module
(``attest/<kind>.py``) that defines one :class:`AttestationKind`; :mod:`modelseal.attest.registry` knows the
kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from modelseal.encoding import b64d
from modelseal.errors import FormatError, ModelsealError
from modelseal.pki import PeerIdentity

REPORT_DATA_SIZE = 64


class EvidenceError(ModelsealError):
    """Evidence is missing, malformed, not genuine, or not bound to this exchange."""


@dataclass(frozen=True)
class VerificationContext:
    """What the evidence is checked against. ``binding`` is None only for offline inspection
    (``modelseal attest verify`` without ``--binding``), where nothing can be bound."""

    peer: PeerIdentity | None
    binding: bytes | None
    nonce: bytes
    now: int


@dataclass
class Claims:
    kind: str
    measurements: dict[str, str] = field(default_factory=dict)
    report_data: str | None = None
    report_data_bound: bool = False
    tcb_status: str | None = None
    debug: bool | None = None
    svn: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # evidence from several devices of one kind (the GPUs of a host): each part must meet the grant on its own
    parts: list[Claims] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "measurements": self.measurements,
            "report_data_bound": self.report_data_bound,
            "tcb_status": self.tcb_status,
            "debug": self.debug,
        }
        if self.report_data is not None:
            out["report_data"] = self.report_data
        if self.svn:
            out["svn"] = self.svn
        if self.details:
            out["details"] = self.details
        return out


class Verifier(Protocol):
    kind: str

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims: ...

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        """Validate a grant's requirement for this kind and return it with safe defaults filled in
        (raise :class:`EvidenceError` when it cannot be met safely, such as a TPM grant with no pinned AK)."""
        ...


Collector = Callable[[bytes, bytes], dict[str, Any]]
"""The host side of a kind: ``(binding, nonce) -> evidence document`` (blocking; the agent runs it in a thread)."""


@dataclass(frozen=True)
class AttestationKind:
    """One kind of evidence, what the key service and the host agent each need of it.

    ``verifier(settings, base)`` builds the key service's verifier from the keys of ``[attestation]`` (in
    ``keyserver.toml``) named in ``settings`` (relative paths resolve against ``base``);
    ``collector(table)`` builds the agent's collector from its config table ``agent_table``, whose keys
    this kind reads are ``agent_keys``. Both raise :class:`~modelseal.errors.UsageError` for bad settings,
    so a misconfigured service or agent fails at start-up, not at the first release.
    """

    name: str
    verifier: Callable[[Mapping[str, Any], Path | None], Verifier]
    collector: Callable[[Mapping[str, Any]], Collector]
    settings: tuple[str, ...] = ()
    agent_table: str | None = None
    agent_keys: tuple[str, ...] = ()


# --- helpers the verifiers share -----------------------------------------------------------------


def evidence_bytes(evidence: dict[str, Any], name: str, kind: str, required: bool = True) -> bytes | None:
    """A base64url field of an evidence document, decoded, or a clear error naming the field."""
    value = evidence.get(name)
    if value is None:
        if required:
            raise EvidenceError(f"{kind} evidence has no {name!r} field")
        return None
    try:
        return b64d(value, what=f"{kind} evidence field {name!r}")
    except FormatError as exc:
        raise EvidenceError(str(exc)) from None


def expected_report_data(binding: bytes) -> bytes:
    """TEE report data carries the 32-byte binding followed by zeros (64 bytes in SGX, TDX and SNP)."""
    return binding.ljust(REPORT_DATA_SIZE, b"\0")


def bind_report_data(claims: Claims, report_data: bytes, ctx: VerificationContext) -> Claims:
    """Record the report data and whether it carries this exchange's binding."""
    claims.report_data = report_data.hex()
    claims.report_data_bound = ctx.binding is not None and report_data == expected_report_data(ctx.binding)
    if ctx.binding is not None and not claims.report_data_bound:
        claims.details["binding_mismatch"] = (
            f"report data {report_data[:32].hex()}… is not this exchange's binding {ctx.binding.hex()}"
        )
    return claims


REQUIREMENT_FIELDS = {"kind", "measurements", "allow_debug", "tcb_status", "min_svn"}


def normalise_requirement(requirement: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """Check a requirement's shape (so a typo cannot silently weaken a grant) and fill in defaults."""
    kind = requirement.get("kind")
    unknown = set(requirement) - REQUIREMENT_FIELDS
    if unknown:
        raise EvidenceError(
            f"{kind} requirement has unknown field(s) {sorted(unknown)} (allowed: {sorted(REQUIREMENT_FIELDS)})"
        )
    measurements = requirement.get("measurements", {})
    if not isinstance(measurements, dict) or not all(
        isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
        for v in measurements.values()
    ):
        raise EvidenceError(f"{kind} requirement: measurements must map names to a value or a list of values")
    if not isinstance(requirement.get("allow_debug", False), bool):
        raise EvidenceError(f"{kind} requirement: allow_debug must be true or false")
    tcb = requirement.get("tcb_status", [])
    if not isinstance(tcb, list) or not all(isinstance(x, str) for x in tcb):
        raise EvidenceError(f"{kind} requirement: tcb_status must be a list of allowed statuses")
    svn = requirement.get("min_svn", {})
    if not isinstance(svn, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in svn.values()):
        raise EvidenceError(f"{kind} requirement: min_svn must map names to integers")
    return {**defaults, **requirement}


def unmet(requirement: dict[str, Any], claims: Claims) -> str | None:
    """Why ``claims`` do not meet one grant requirement, or None if they do.

    A requirement is ``{"kind": K, "measurements": {NAME: VALUE or [VALUES]}, "allow_debug": bool,
    "tcb_status": [ALLOWED...], "min_svn": {NAME: INT}}``; everything but ``kind`` is optional. Claims with
    ``parts`` (several devices) meet it only if every part does, and the whole does (``gpu_count``).
    """
    if claims.parts:
        wanted = requirement.get("measurements") or {}
        per_device = {k: v for k, v in wanted.items() if k in claims.parts[0].measurements}
        for position, part in enumerate(claims.parts):
            problem = unmet({**requirement, "measurements": per_device}, part)
            if problem:
                return f"device {position}: {problem}"
        requirement = {**requirement, "measurements": {k: v for k, v in wanted.items() if k not in per_device}}
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
    for name, minimum in (requirement.get("min_svn") or {}).items():
        have = claims.svn.get(name)
        if have is None:
            return f"{claims.kind} evidence has no security version {name!r}"
        if have < int(minimum):
            return f"{claims.kind} security version {name} = {have} is below the grant's minimum {minimum}"
    return None
