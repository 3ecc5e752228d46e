"""The ``mtls`` verifier: the host proved possession of its client-certificate key in the TLS handshake.

It proves *who* the host is (its key, its SANs), not *what software* it runs; grants that need more
require TEE or TPM evidence as well. The TLS channel carries the nonce and the ephemeral key, so the
binding holds by construction. A certificate whose URI SANs cannot be identities (``spki:...``, dot
segments: :func:`modelseal.pki.identity_uri`) proves nothing: the key service refuses it before any
grant is looked at, and this verifier refuses it again.

The host collects nothing: its evidence document only names the kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelseal.attest.base import (
    AttestationKind,
    Claims,
    Collector,
    EvidenceError,
    VerificationContext,
    normalise_requirement,
)


class MtlsVerifier:
    kind = "mtls"

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims:
        if ctx.peer is None:
            raise EvidenceError("mtls evidence exists only inside a TLS connection to the key service")
        if ctx.peer.refused_uris:
            raise EvidenceError(f"the client certificate {ctx.peer.spki} is refused: {ctx.peer.refused_uris[0]}")
        return Claims(
            kind=self.kind,
            measurements={"spki": ctx.peer.spki, **{f"uri{i}": u for i, u in enumerate(ctx.peer.uris)}},
            report_data_bound=True,
            details={"subject": ctx.peer.subject},
        )

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        return normalise_requirement(requirement)


def collect_mtls(binding: bytes, nonce: bytes) -> dict[str, Any]:
    """The TLS channel carries the proof, so the document is empty but for its kind."""
    return {"kind": "mtls"}


def _verifier(settings: Mapping[str, Any], base: Path | None) -> MtlsVerifier:
    return MtlsVerifier()


def _collector(table: Mapping[str, Any]) -> Collector:
    return collect_mtls


KIND = AttestationKind("mtls", verifier=_verifier, collector=_collector)
