"""The ``sev-snp`` verifier: an AMD SEV-SNP attestation report signed by the chip's VCEK.

Evidence::

    {"kind": "sev-snp", "report": base64 (1184 bytes), "vcek": base64 DER, "cert_chain": "PEM ASK + ARK"}

Checks, all with ``cryptography``: the ARK is one of the pinned AMD root keys (by SHA-256 of its DER; the
Milan ARK ships, others are configured), ARK self-signature, ARK -> ASK -> VCEK (RSA-PSS/SHA-384), every
certificate inside its validity period, the VCEK's chip id and TCB extensions equal the report's, and the
report's ECDSA P-384/SHA-384 signature over its first 0x2A0 bytes.

What it proves: the report (launch measurement, policy, host data, TCB) comes from a genuine AMD SEV-SNP
processor, and with the binding in report data, for this exchange. What it does not prove: that the
launch measurement is the image you meant (pin ``measurement`` in the grant), or that the ASK has not been
revoked (AMD's CRL is not checked here, see docs/attestation.md). VLEK-signed reports are not supported.

Key service, ``[attestation]``: ``snp_ark_sha256 = {"<sha256 of an ARK's DER>" = "Genoa"}`` trusts more AMD
roots besides Milan's. On the host, :class:`SnpCollector` gets the report from configfs-tsm and the
certificates from the report's auxiliary blob (the GHCB certificate table) or, agent ``[tsm]``, from the
files ``vcek`` and ``cert_chain``.
"""

from __future__ import annotations

import struct
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelseal.attest.base import (
    AttestationKind,
    Claims,
    EvidenceError,
    VerificationContext,
    bind_report_data,
    evidence_bytes,
    normalise_requirement,
)
from modelseal.attest.certchain import MALFORMED, check_unsigned_fields, check_valid_at
from modelseal.attest.tsm import TSM_REPORTS, tsm_report
from modelseal.encoding import b64e
from modelseal.errors import UsageError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
POLICY_DEBUG = 1 << 19
# SHA-256 of the DER of AMD's published root keys (kdsintf.amd.com/vcek/v1/<product>/cert_chain).
AMD_ARKS = {"69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd": "Milan"}
OID_SPL = {  # VCEK extensions: security patch levels that must equal the report's reported TCB
    "boot_loader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
}
OID_HWID = "1.3.6.1.4.1.3704.1.4"
TCB_BYTE = {"boot_loader": 0, "tee": 1, "snp": 6, "microcode": 7}  # Milan/Genoa TCB_VERSION layout


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """Load a DER or PEM certificate. AMD VCEKs have serial number 0, which ``cryptography`` accepts with a
    deprecation warning (constraints.txt pins the version that still does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise EvidenceError(f"the {what} certificate is malformed: {exc}") from None


def load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise EvidenceError(f"the ASK/ARK certificate chain is malformed: {exc}") from None


def check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    check_unsigned_fields(cert, what)
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or cert.signature_hash_algorithm is None:
        raise EvidenceError(f"the {what} certificate is not signed with RSA-PSS/SHA-384 as AMD's are")
    if cert.issuer != issuer.subject:
        raise EvidenceError(f"the {what} certificate was not issued by {issuer.subject.rfc4514_string()}")
    try:
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PSS(padding.MGF1(cert.signature_hash_algorithm), padding.PSS.DIGEST_LENGTH),
            cert.signature_hash_algorithm,
        )
    except InvalidSignature:
        raise EvidenceError(f"the {what} certificate's signature does not verify") from None


def extension_int(cert: x509.Certificate, oid: str) -> int:
    try:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        raise EvidenceError(f"the VCEK certificate lacks extension {oid}") from None
    raw = getattr(value, "value", b"")
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:  # DER INTEGER, short form
        raise EvidenceError(f"the VCEK certificate's extension {oid} is not an integer")
    return int.from_bytes(raw[2:], "big")


class SnpVerifier:
    kind = "sev-snp"

    def __init__(self, extra_arks: dict[str, str] | None = None) -> None:
        self.arks = {**AMD_ARKS, **(extra_arks or {})}

    def chain(self, evidence: dict[str, Any], now: int) -> tuple[x509.Certificate, str]:
        """Verify ARK -> ASK -> VCEK; return the VCEK and the product its pinned ARK stands for."""
        vcek = load_certificate(evidence_bytes(evidence, "vcek", self.kind) or b"", "VCEK")
        pem = evidence.get("cert_chain")
        if not isinstance(pem, str):
            raise EvidenceError("sev-snp evidence has no 'cert_chain' (PEM of the ASK and ARK)")
        certs = load_chain(pem.encode())
        arks = [c for c in certs if c.fingerprint(hashes.SHA256()).hex() in self.arks]
        if not arks:
            raise EvidenceError("the certificate chain does not contain a pinned AMD root key (ARK)")
        ark = arks[0]
        asks = [c for c in certs if c.issuer == ark.subject and c.subject != ark.subject]
        if not asks:
            raise EvidenceError(f"the certificate chain has no ASK issued by {ark.subject.rfc4514_string()}")
        ask = asks[0]
        check_signed_by(ark, ark, "ARK")
        check_signed_by(ask, ark, "ASK")
        check_signed_by(vcek, ask, "VCEK")
        for cert, what in ((ark, "ARK"), (ask, "ASK"), (vcek, "VCEK")):
            check_valid_at(cert, now, what)
        return vcek, self.arks[ark.fingerprint(hashes.SHA256()).hex()]

    @staticmethod
    def match_vcek(vcek: x509.Certificate, report: bytes) -> dict[str, int]:
        """The VCEK must be this chip's (hwID = chip id) at this TCB (SPL extensions = reported TCB)."""
        reported_tcb, chip_id = report[0x180:0x188], report[0x1A0:0x1E0]
        hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID)).value
        if getattr(hwid, "value", b"") != chip_id:
            raise EvidenceError("the VCEK certificate is for another chip than the one in the report (chip id)")
        svn = {}
        for name, oid in OID_SPL.items():
            svn[name] = reported_tcb[TCB_BYTE[name]]
            if extension_int(vcek, oid) != svn[name]:
                raise EvidenceError(f"the VCEK certificate's {name} TCB level differs from the report's reported TCB")
        return svn

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims:
        report = evidence_bytes(evidence, "report", self.kind) or b""
        if len(report) != REPORT_SIZE:
            raise EvidenceError(f"an SEV-SNP report is {REPORT_SIZE} bytes, this one is {len(report)}")
        version, guest_svn, policy = struct.unpack_from("<IIQ", report, 0)
        vmpl, sig_algo = struct.unpack_from("<II", report, 0x30)
        flags = struct.unpack_from("<I", report, 0x48)[0]
        if version < 2:
            raise EvidenceError(f"SEV-SNP report version {version} is not supported (2 or later)")
        if sig_algo != 1:
            raise EvidenceError(f"SEV-SNP report signature algorithm {sig_algo} is not ECDSA P-384/SHA-384")
        if (flags >> 2) & 0b111 != 0:
            raise EvidenceError("the SEV-SNP report is signed by a VLEK; only VCEK-signed reports are supported")
        if any(report[SIGNED_SIZE + 144 :]):
            raise EvidenceError("the SEV-SNP report's reserved bytes after the signature are not zero")
        if flags & 0b10:
            raise EvidenceError("the SEV-SNP report masks the chip id (MASK_CHIP_KEY), so its VCEK cannot be matched")
        try:  # cryptography parses certificate fields lazily: a damaged one raises ValueError on access
            vcek, product = self.chain(evidence, ctx.now)
            svn = self.match_vcek(vcek, report)
        except (*MALFORMED, x509.ExtensionNotFound) as exc:
            raise EvidenceError(f"a certificate in the SEV-SNP evidence is malformed: {exc}") from None
        chip_id = report[0x1A0:0x1E0]
        r = int.from_bytes(report[SIGNED_SIZE : SIGNED_SIZE + 72], "little")
        s = int.from_bytes(report[SIGNED_SIZE + 72 : SIGNED_SIZE + 144], "little")
        key = vcek.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EvidenceError("the VCEK certificate does not hold an ECDSA key")
        try:
            key.verify(encode_dss_signature(r, s), report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise EvidenceError("the SEV-SNP report's signature does not verify with the chip's VCEK") from None
        claims = Claims(
            kind=self.kind,
            measurements={
                "measurement": report[0x90:0xC0].hex(),
                "host_data": report[0xC0:0xE0].hex(),
                "id_key_digest": report[0xE0:0x110].hex(),
                "author_key_digest": report[0x110:0x140].hex(),
                "family_id": report[0x10:0x20].hex(),
                "image_id": report[0x20:0x30].hex(),
                "chip_id": chip_id.hex(),
                "vmpl": str(vmpl),
                "policy": f"{policy:016x}",
            },
            debug=bool(policy & POLICY_DEBUG),
            svn={**svn, "guest_svn": guest_svn},
            details={"version": version, "product": product},
        )
        return bind_report_data(claims, report[0x50:0x90], ctx)

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        return normalise_requirement(requirement)


def _verifier(settings: Mapping[str, Any], base: Path | None) -> SnpVerifier:
    arks = settings.get("snp_ark_sha256", {})
    if not isinstance(arks, dict) or not all(isinstance(v, str) for v in arks.values()):
        raise UsageError("[attestation] snp_ark_sha256 must map SHA-256 fingerprints to product names")
    return SnpVerifier({k.lower().replace(":", ""): v for k, v in arks.items()})


# --- the host side -------------------------------------------------------------------------------------

# GUIDs of the SEV-SNP extended-report certificate table (GHCB spec), compared in both byte orders.
SNP_CERT_GUIDS = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
}


def snp_cert_table(table: bytes) -> dict[str, bytes]:
    """Split an SNP certificate table (GUID, offset, length entries, zero-terminated) into DER certs."""
    names = {}
    for name, text in SNP_CERT_GUIDS.items():
        u = uuid.UUID(text)
        names[u.bytes] = names[u.bytes_le] = name
    certs: dict[str, bytes] = {}
    for pos in range(0, len(table) - 23, 24):
        guid = table[pos : pos + 16]
        if guid == bytes(16):
            return certs
        offset = int.from_bytes(table[pos + 16 : pos + 20], "little")
        length = int.from_bytes(table[pos + 20 : pos + 24], "little")
        if offset + length > len(table):
            raise EvidenceError("the SEV-SNP certificate table points past its end")
        if guid in names:
            certs[names[guid]] = table[offset : offset + length]
    raise EvidenceError("the SEV-SNP certificate table has no terminating entry")


def _read_setting_file(settings: Mapping[str, Any], name: str) -> bytes:
    path = settings.get(name)
    if not path:
        raise EvidenceError(f"the host gave no {name.upper()} certificate; set [tsm] {name} to its file")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EvidenceError(f"[tsm] {name}: cannot read {path}: {exc.strerror}") from None


class SnpCollector:
    """An SEV-SNP report from configfs-tsm with the binding as report data, and its VCEK, ASK and ARK."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.root = Path(settings.get("path", TSM_REPORTS))

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        report, aux = tsm_report(self.root, "sev_guest", binding)
        certs = snp_cert_table(aux) if aux else {}
        vcek = certs.get("vcek") or _read_setting_file(self.settings, "vcek")
        chain = _read_setting_file(self.settings, "cert_chain") if "cert_chain" in self.settings else None
        if chain is None:
            if not ("ask" in certs and "ark" in certs):
                raise EvidenceError("the host gave no ASK/ARK certificates; set [tsm] cert_chain to AMD's PEM chain")
            ders = (certs["ask"], certs["ark"])
            chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders)
        return {"kind": "sev-snp", "report": b64e(report), "vcek": b64e(vcek), "cert_chain": chain.decode()}


KIND = AttestationKind(
    "sev-snp",
    verifier=_verifier,
    collector=SnpCollector,
    settings=("snp_ark_sha256",),
    agent_table="tsm",
    agent_keys=("path", "vcek", "cert_chain"),
)
