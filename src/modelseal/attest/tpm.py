"""The ``tpm`` verifier: a TPM 2.0 quote over chosen PCRs, signed by an enrolled attestation key (AK).

Evidence (what ``modelseal agent`` sends, all base64 but ``pcrs``)::

    {"kind": "tpm", "ak_public": TPM2B_PUBLIC, "quote": TPMS_ATTEST, "signature": TPMT_SIGNATURE,
     "pcrs": {"sha256": {"16": "hex", ...}}}

What it proves: the quote was produced by the TPM holding the AK whose *name* the grant pins
(``measurements.ak``), for this exchange (``extraData`` equals the binding, so no replay), and the listed
PCR values are the ones the TPM had (their digest matches the signed one). A grant then pins PCR values
(``measurements["pcr.sha256.16"]``). What it does not prove: that the AK belongs to a genuine TPM chip
(the owner enrols the AK, see docs/attestation.md), or anything the PCRs do not measure.

On the host, :class:`TpmCollector` quotes through ``tpm2-tools`` (:mod:`modelseal.attest.tpm_tools`), with
the agent's ``[tpm]`` table: ``tcti`` (required), ``ak_handle``, ``pcrs``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding

from modelseal.attest import tpm_structs as ts
from modelseal.attest import tpm_tools
from modelseal.attest.base import (
    AttestationKind,
    Claims,
    EvidenceError,
    VerificationContext,
    evidence_bytes,
    normalise_requirement,
)
from modelseal.attest.tpm_tools import DEFAULT_HANDLE, DEFAULT_PCRS
from modelseal.encoding import b64e
from modelseal.errors import UsageError


def pcr_values(evidence: dict[str, Any], quote: ts.Quote) -> tuple[dict[str, str], bytes]:
    """The PCR values the quote selects, from the evidence, checked against the quote's signed digest."""
    banks = evidence.get("pcrs")
    if not isinstance(banks, dict):
        raise EvidenceError("tpm evidence has no 'pcrs' object ({bank: {index: hex}})")
    values: dict[str, str] = {}
    concatenated = b""
    for bank, indices in quote.selection:
        given = banks.get(bank)
        for index in indices:
            value = given.get(str(index)) if isinstance(given, dict) else None
            if not isinstance(value, str):
                raise EvidenceError(f"tpm evidence lacks PCR {bank}:{index}, which the quote covers")
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise EvidenceError(f"tpm evidence PCR {bank}:{index} is not hex") from None
            concatenated += raw
            values[f"pcr.{bank}.{index}"] = raw.hex()
    return values, concatenated


class TpmVerifier:
    kind = "tpm"

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims:
        ak = ts.parse_public(evidence_bytes(evidence, "ak_public", self.kind) or b"")
        ts.check_attestation_key(ak)
        attest = evidence_bytes(evidence, "quote", self.kind) or b""
        signature = ts.parse_signature(evidence_bytes(evidence, "signature", self.kind) or b"")
        try:
            if isinstance(ak.public_key, ec.EllipticCurvePublicKey):
                if signature.algorithm != ts.ALG_ECDSA:
                    raise InvalidSignature
                ak.public_key.verify(signature.value, attest, ec.ECDSA(signature.hash()))
            else:
                scheme: padding.AsymmetricPadding = (
                    padding.PKCS1v15()
                    if signature.algorithm == ts.ALG_RSASSA
                    else padding.PSS(padding.MGF1(signature.hash()), padding.PSS.AUTO)
                )
                ak.public_key.verify(signature.value, attest, scheme, signature.hash())
        except InvalidSignature:
            raise EvidenceError(f"the TPM quote's signature does not verify with attestation key {ak.name}") from None
        quote = ts.parse_quote(attest)
        values, concatenated = pcr_values(evidence, quote)
        if hashlib.new(signature.hash().name, concatenated).digest() != quote.pcr_digest:
            raise EvidenceError("the PCR values presented do not match the digest the TPM signed in the quote")
        claims = Claims(
            kind=self.kind,
            measurements={"ak": ak.name, **values},
            details={
                "clock": quote.clock,
                "reset_count": quote.reset_count,
                "restart_count": quote.restart_count,
                "firmware_version": f"{quote.firmware_version:016x}",
            },
        )
        claims.report_data = quote.extra_data.hex()
        claims.report_data_bound = ctx.binding is not None and quote.extra_data == ctx.binding
        if ctx.binding is not None and not claims.report_data_bound:
            claims.details["binding_mismatch"] = (
                f"the quote's nonce {quote.extra_data.hex()} is not this exchange's binding {ctx.binding.hex()}"
            )
        return claims

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        normalised = normalise_requirement(requirement)
        ak = normalised.get("measurements", {}).get("ak")
        if not ak:
            raise EvidenceError(
                "a tpm requirement must pin the host's attestation key: measurements.ak = its TPM name "
                "(printed by `modelseal agent tpm-enroll`); without it any software key could sign a quote"
            )
        return normalised


class TpmCollector:
    """A TPM 2.0 quote over ``pcrs`` (tpm2-tools syntax, e.g. ``sha256:0,7,16``) with the binding as nonce."""

    def __init__(self, tcti: str, ak_handle: str = DEFAULT_HANDLE, pcrs: str = DEFAULT_PCRS) -> None:
        self.tcti, self.ak_handle, self.pcrs = tcti, ak_handle, pcrs
        self._ak_public: bytes | None = None

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        if self._ak_public is None:  # read once: restart the agent after re-enrolling with --replace
            self._ak_public = tpm_tools.read_ak_public(self.tcti, self.ak_handle)
        attest, signature, pcrs = tpm_tools.quote(self.tcti, self.ak_handle, self.pcrs, binding)
        return {
            "kind": "tpm",
            "ak_public": b64e(self._ak_public),
            "quote": b64e(attest),
            "signature": b64e(signature),
            "pcrs": pcrs,
        }


def _verifier(settings: Mapping[str, Any], base: Path | None) -> TpmVerifier:
    return TpmVerifier()


def _collector(table: Mapping[str, Any]) -> TpmCollector:
    if "tcti" not in table:
        raise UsageError('evidence "tpm" needs [tpm] tcti (e.g. "device:/dev/tpmrm0")')
    return TpmCollector(
        str(table["tcti"]), str(table.get("ak_handle", DEFAULT_HANDLE)), str(table.get("pcrs", DEFAULT_PCRS))
    )


KIND = AttestationKind(
    "tpm",
    verifier=_verifier,
    collector=_collector,
    agent_table="tpm",
    agent_keys=("tcti", "ak_handle", "pcrs"),
)
