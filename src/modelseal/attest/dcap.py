"""The ``sgx`` and ``tdx`` verifiers: Intel DCAP quotes, checked by the ``dcap-qvl`` library.

Evidence::

    {"kind": "sgx" | "tdx", "quote": base64, "collateral": {pck_crl_issuer_chain, root_ca_crl, pck_crl,
     tcb_info_issuer_chain, tcb_info, tcb_info_signature, qe_identity_issuer_chain, qe_identity,
     qe_identity_signature}}

``dcap-qvl`` checks the whole chain at the verification time: Intel's root CA (pinned in the library, or
``root_ca_der`` here) -> PCK certificate in the quote -> attestation key -> quoting enclave report ->
the TEE report, with the collateral's CRLs, TCB info and QE identity signed by Intel and inside their
validity window. The collateral comes from the host (the agent fetches it from a PCCS); that is safe
because Intel signs it, and its ``nextUpdate`` bounds how stale it can be (about 30 days).

What it proves: the report (measurements, attributes, report data) comes from a genuine Intel TEE at the
reported TCB level, and, with the binding in report data, that it was made for this exchange. What it does
not prove: that the measured code is the code you meant (pin ``mr_enclave``/``mr_signer`` or ``mr_td`` and
the RTMRs in the grant), or anything about TCB recovery after the collateral was issued.

This module is the DCAP part the ``sgx`` and ``tdx`` kinds (:mod:`modelseal.attest.sgx`,
:mod:`modelseal.attest.tdx`) share: the verifier, its ``dcap_root_ca`` setting, and the host's fetch of
collateral from a PCCS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from modelseal.attest.base import (
    AttestationKind,
    Claims,
    EvidenceError,
    VerificationContext,
    bind_report_data,
    evidence_bytes,
    normalise_requirement,
)
from modelseal.errors import UsageError

SGX_DEBUG = 0x02  # ATTRIBUTES.DEBUG, bit 1 of the first byte
TDX_DEBUG = 0x01  # TDATTRIBUTES.DEBUG, bit 0 of the first byte
TD_REGISTERS = ("mr_td", "mr_seam", "mr_signer_seam", "mr_config_id", "mr_owner", "mr_owner_config")
# SHA-256 of the DER of "Intel SGX Root CA" (certificates.trustedservices.intel.com/Intel_SGX_Provisioning_
# Certification_RootCA.cer), the root dcap-qvl pins too.
INTEL_SGX_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
PCK_CHAIN, QE_REPORT_DATA = 5, 6  # certification data types (Intel DCAP quote library)


def _u16(raw: bytes, pos: int) -> int:
    return int(struct.unpack_from("<H", raw, pos)[0])


def _u32(raw: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", raw, pos)[0])


def quote_pck_chain(raw: bytes, kind: str) -> bytes:
    """Walk the quote's layout (v3, v4, v5) to its PCK certificate chain, insisting that every length and
    type field is exact and any padding after the signature data is zero.

    dcap-qvl checks everything signed; this makes the *unsigned* framing strict too, so that no byte of a
    quote can change without the quote being rejected (see docs/attestation.md)."""
    try:
        version, tee_type = _u16(raw, 0), _u32(raw, 4)
        pos = 48
        if version == 5:
            pos += 6 + _u32(raw, pos + 2)
        elif version in (3, 4):
            pos += 384 if tee_type == 0 else 584
        else:
            raise EvidenceError(f"{kind} quote version {version} is not supported (3, 4 or 5)")
        end = pos + 4 + _u32(raw, pos)
        if end > len(raw) or any(raw[end:]):
            raise EvidenceError(f"{kind} quote's signature data length does not match its size")
        pos += 4 + 128  # length, ECDSA signature, attestation public key
        if version >= 4:
            if _u16(raw, pos) != QE_REPORT_DATA or pos + 6 + _u32(raw, pos + 2) != end:
                raise EvidenceError(f"{kind} quote's certification data header is not a QE report of the right size")
            pos += 6
        pos += 384 + 64  # QE report and its signature
        pos += 2 + _u16(raw, pos)  # QE authentication data
        if _u16(raw, pos) != PCK_CHAIN or pos + 6 + _u32(raw, pos + 2) != end:
            raise EvidenceError(f"{kind} quote does not end with a PCK certificate chain of the declared size")
        return raw[pos + 6 : end]
    except struct.error:
        raise EvidenceError(f"{kind} quote is truncated") from None


def check_pck_chain(pem: bytes, kind: str, root_ca_der: bytes | None) -> None:
    """The chain must be canonical PEM (nothing but the certificates, optionally NUL-terminated) and end in
    the pinned Intel root, which dcap-qvl would otherwise skip over."""
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\0"))
    except (ValueError, x509.InvalidVersion) as exc:
        raise EvidenceError(f"{kind} quote's PCK certificate chain is malformed: {exc}") from None
    canonical = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    if pem.rstrip(b"\0") != canonical or len(pem) - len(canonical) > 1:
        raise EvidenceError(f"{kind} quote's PCK certificate chain is not canonical PEM")
    root = certs[-1].public_bytes(serialization.Encoding.DER)
    expected = hashlib.sha256(root_ca_der).hexdigest() if root_ca_der else INTEL_SGX_ROOT_SHA256
    if certs[-1].fingerprint(hashes.SHA256()).hex() != expected or hashlib.sha256(root).hexdigest() != expected:
        raise EvidenceError(f"{kind} quote's PCK certificate chain does not end in the pinned Intel root CA")


def dcap_module() -> Any:
    try:
        import dcap_qvl
    except ImportError:
        raise EvidenceError("verifying SGX/TDX quotes needs dcap-qvl: pip install 'modelseal[keyserver]'") from None
    return dcap_qvl


def load_collateral(evidence: dict[str, Any], kind: str) -> Any:
    collateral = evidence.get("collateral")
    if not isinstance(collateral, dict):
        raise EvidenceError(f"{kind} evidence has no 'collateral' object (PCK CRLs, TCB info, QE identity)")
    try:
        return dcap_module().QuoteCollateralV3.from_json(json.dumps(collateral))
    except (ValueError, TypeError) as exc:
        raise EvidenceError(f"{kind} collateral is malformed: {exc}") from None


class DcapVerifier:
    def __init__(self, kind: str, root_ca_der: bytes | None = None) -> None:
        self.kind, self.root_ca_der = kind, root_ca_der

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims:
        dcap = dcap_module()
        raw = evidence_bytes(evidence, "quote", self.kind) or b""
        collateral = load_collateral(evidence, self.kind)
        try:
            parsed = dcap.parse_quote(raw)
        except ValueError as exc:
            raise EvidenceError(f"{self.kind} quote is malformed: {exc}") from None
        if parsed.quote_type().lower() != self.kind:
            raise EvidenceError(f"the quote is a {parsed.quote_type()} quote, not {self.kind.upper()}")
        check_pck_chain(quote_pck_chain(raw, self.kind), self.kind, self.root_ca_der)
        try:
            if self.root_ca_der is None:
                report = dcap.verify(raw, collateral, ctx.now)
            else:
                report = dcap.verify_with_root_ca(raw, collateral, self.root_ca_der, ctx.now)
        except ValueError as exc:
            reason = str(exc).splitlines()[0].removeprefix("Verification failed: ")
            raise EvidenceError(f"{self.kind} quote rejected by DCAP verification: {reason}") from None
        result = json.loads(report.to_json())
        if result["status"] == "Revoked":
            raise EvidenceError(f"{self.kind} quote comes from a platform whose TCB Intel has revoked")
        body = next(iter(result["report"].values()))
        claims = Claims(
            kind=self.kind,
            tcb_status=result["status"],
            details={"advisory_ids": result.get("advisory_ids", []), "fmspc": parsed.fmspc()},
        )
        if self.kind == "sgx":
            claims.measurements = {
                "mr_enclave": body["mr_enclave"],
                "mr_signer": body["mr_signer"],
                "isv_prod_id": str(body["isv_prod_id"]),
            }
            claims.svn = {"isv_svn": int(body["isv_svn"])}
            claims.debug = bool(bytes.fromhex(body["attributes"])[0] & SGX_DEBUG)
        else:
            claims.measurements = {name: body[name] for name in TD_REGISTERS}
            claims.measurements.update({f"rtmr{i}": body[f"rt_mr{i}"] for i in range(4)})
            claims.debug = bool(bytes.fromhex(body["td_attributes"])[0] & TDX_DEBUG)
        return bind_report_data(claims, bytes.fromhex(body["report_data"]), ctx)

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        # Without an explicit list, only an up-to-date platform passes: a grant must opt in to less.
        return normalise_requirement(requirement, tcb_status=["UpToDate"])


def root_ca(settings: Mapping[str, Any], base: Path | None) -> bytes | None:
    """``[attestation] dcap_root_ca``: the DER of an Intel root CA to pin instead of dcap-qvl's, or None."""
    root = settings.get("dcap_root_ca")
    if root is None:
        return None
    path = (base or Path()) / str(root)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"[attestation] dcap_root_ca: cannot read {path}: {exc.strerror}") from None


def kind_of(kind: str, collector: Callable[[Mapping[str, Any]], Any], agent_table: str) -> AttestationKind:
    """A DCAP-quoted kind (``sgx``, ``tdx``): the one verifier, pinned to ``[attestation] dcap_root_ca``, and
    the kind's own collector, which reads ``path`` and ``pccs_url`` from its agent table."""

    def verifier(settings: Mapping[str, Any], base: Path | None) -> DcapVerifier:
        return DcapVerifier(kind, root_ca(settings, base))

    return AttestationKind(kind, verifier=verifier, collector=collector, settings=("dcap_root_ca",),
                           agent_table=agent_table, agent_keys=("path", "pccs_url"))  # fmt: skip


def pccs_collateral(pccs_url: str, quote: bytes) -> dict[str, Any]:
    """Collateral for a DCAP quote from a PCCS, on the host (Intel-signed, so the service can check it)."""
    try:
        import dcap_qvl
    except ImportError:
        raise EvidenceError("collecting SGX/TDX evidence needs dcap-qvl: pip install 'modelseal[agent]'") from None
    try:
        collateral = asyncio.run(dcap_qvl.get_collateral(pccs_url, quote))
    except (ValueError, RuntimeError) as exc:
        raise EvidenceError(f"cannot fetch DCAP collateral from {pccs_url}: {exc}") from None
    return dict(json.loads(collateral.to_json()))
