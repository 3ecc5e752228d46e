"""Attestation: evidence in, verified claims out (see :mod:`modelseal.attest.base`)."""

from modelseal.attest.base import (
    Claims,
    EvidenceError,
    VerificationContext,
    Verifier,
    get_verifier,
    known_kinds,
    register_verifier,
)

__all__ = [
    "Claims",
    "EvidenceError",
    "VerificationContext",
    "Verifier",
    "get_verifier",
    "known_kinds",
    "register_verifier",
]
