"""Attestation: evidence in, verified claims out (see :mod:`modelseal.attest.base`).

Each kind (``mtls``, ``tpm``, ``tdx``, ``sev-snp``, ``sgx``, and any an installed package adds) is one module
holding its verifier and its host-side collector; :mod:`modelseal.attest.registry` knows them.
"""

from modelseal.attest.base import (
    AttestationKind,
    Claims,
    Collector,
    EvidenceError,
    VerificationContext,
    Verifier,
)
from modelseal.attest.registry import (
    ENTRY_POINT_GROUP,
    collectors_from_config,
    get_verifier,
    known_kinds,
    register_kind,
    register_verifier,
    verifiers_from_config,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttestationKind",
    "Claims",
    "Collector",
    "EvidenceError",
    "VerificationContext",
    "Verifier",
    "collectors_from_config",
    "get_verifier",
    "known_kinds",
    "register_kind",
    "register_verifier",
    "verifiers_from_config",
]
