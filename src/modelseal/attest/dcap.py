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
"""

from __future__ import annotations

import json
from typing import Any

from modelseal.attest.base import (
    Claims,
    EvidenceError,
    VerificationContext,
    bind_report_data,
    evidence_bytes,
    normalise_requirement,
    register_verifier,
)

SGX_DEBUG = 0x02  # ATTRIBUTES.DEBUG, bit 1 of the first byte
TDX_DEBUG = 0x01  # TDATTRIBUTES.DEBUG, bit 0 of the first byte
TD_REGISTERS = ("mr_td", "mr_seam", "mr_signer_seam", "mr_config_id", "mr_owner", "mr_owner_config")


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


register_verifier(DcapVerifier("sgx"))
register_verifier(DcapVerifier("tdx"))
