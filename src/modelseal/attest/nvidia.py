"""The ``nvidia-gpu`` kind: NVIDIA Hopper GPUs in confidential-computing mode, verified offline.

Evidence (one piece for all the GPUs of a host, each bound to the same challenge)::

    {"kind": "nvidia-gpu",
     "gpus": [{"report": base64 (SPDM GET_MEASUREMENTS request + signed MEASUREMENTS response),
               "cert_chain": "PEM, leaf first, ending at NVIDIA's device identity root"}, ...],
     "rims": [base64 of a driver or VBIOS RIM, ...]}          # optional, each distinct RIM once

For each GPU, with ``cryptography`` and :mod:`modelseal.attest.nvidia_rim` only (no NVIDIA service):

1. the report parses strictly (:mod:`modelseal.attest.spdm`);
2. the certificate chain ends at the pinned NVIDIA device identity root, every certificate signed by the
   next and valid at the verification time; the leaf's FWID extension equals the report's FWID;
3. the report's ECDSA P-384 / SHA-384 signature over the request and the response verifies with the leaf;
4. the request's nonce is the exchange's binding (the agent asks NVML for a report with nonce = binding);
5. the driver RIM whose version is the report's driver version and the VBIOS RIM whose version is the
   report's VBIOS version are signed to the pinned NVIDIA RIM root; no index is active in both; and every
   active golden measurement (RIM index *i* is SPDM block *i + 1*) equals the report's block, one of its
   alternatives. As NVIDIA's verifier does, index 35 is not compared when the report says NVDEC0 is off.

RIMs come from the key service's ``nvidia_rims`` setting: the owner chooses which driver and VBIOS releases
it accepts. A host may attach NVIDIA's files to its evidence, and with ``nvidia_host_rims = true`` they count
too; not by default, because NVIDIA signs test RIMs with its production chain (a RIM is ~20 KiB: raise
``max_body_bytes`` for hosts that attach them).

Claims, for grants: ``gpu_model``, ``driver_version``, ``vbios_version``, ``gpu_count`` and ``rim_match``
(always ``true``: a mismatch refuses). Confidential-computing mode and developer-tools mode are not
fields of the report; NVIDIA's golden measurements are those of a GPU in CC mode with developer tools off,
and a GPU in developer-tools mode does not match them (nvtrust then reports "GPU attestation failed"), so a
verified report means CC on, devtools off: ``debug`` is ``False``. What NVML told the host is kept under
``details`` as host-reported, never as a claim. Revocation of the GPU's certificates: from OCSP responses
the host attaches (:mod:`modelseal.attest.ocsp`), required with ``nvidia_ocsp = true``; RIM certificates'
revocation is the owner's to watch (they choose the RIMs).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelseal.attest.base import (
    AttestationKind,
    Claims,
    EvidenceError,
    VerificationContext,
    evidence_bytes,
    normalise_requirement,
)
from modelseal.attest.certchain import MALFORMED, load_pem_chain, load_root, verify_chain
from modelseal.attest.ocsp import check_chain_revocation, request_for
from modelseal.attest.spdm import MeasurementReport, parse_report
from modelseal.encoding import b64e
from modelseal.errors import UsageError
from modelseal.pki import spki_hash

if TYPE_CHECKING:  # the RIM module needs signxml and lxml, imported only when a GPU is verified
    from modelseal.attest.nvidia_rim import Rim

KIND_NAME = "nvidia-gpu"
MAX_GPUS = 16
MAX_RIM = 4 * 1024 * 1024
MAX_ATTACHED_RIMS = 8
MAX_OCSP = 8
NVDEC0_DISABLED = b"\x55"
NVDEC0_INDEX = 35  # nvtrust skips this golden index when the report says NVDEC0 is disabled
OID_TCG_DICE_FWID = x509.ObjectIdentifier("2.23.133.5.4.1")

# NVIDIA's roots, pinned (public certificates from NVIDIA/nvtrust, Apache-2.0). The device identity root
# certifies every GPU's attestation key through its chain; the CoRIM signing root signs the RIMs.
NVIDIA_DEVICE_ROOT = b"""-----BEGIN CERTIFICATE-----
MIICCzCCAZCgAwIBAgIQLTZwscoQBBHB/sDoKgZbVDAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjExMTA1MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMDUxIjAgBgNVBAMM
GU5WSURJQSBEZXZpY2UgSWRlbnRpdHkgQ0ExDzANBgNVBAoMBk5WSURJQTB2MBAG
ByqGSM49AgEGBSuBBAAiA2IABA5MFKM7+KViZljbQSlgfky/RRnEQScW9NDZF8SX
gAW96r6u/Ve8ZggtcYpPi2BS4VFu6KfEIrhN6FcHG7WP05W+oM+hxj7nyA1r1jkB
2Ry70YfThX3Ba1zOryOP+MJ9vaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFFeF/4PyY8xlfWi3Olv0jUrL+0lfMB8GA1UdIwQY
MBaAFFeF/4PyY8xlfWi3Olv0jUrL+0lfMAoGCCqGSM49BAMDA2kAMGYCMQCPeFM3
TASsKQVaT+8S0sO9u97PVGCpE9d/I42IT7k3UUOLSR/qvJynVOD1vQKVXf0CMQC+
EY55WYoDBvs2wPAH1Gw4LbcwUN8QCff8bFmV4ZxjCRr4WXTLFHBKjbfneGSBWwA=
-----END CERTIFICATE-----
"""
NVIDIA_RIM_ROOT = b"""-----BEGIN CERTIFICATE-----
MIICKTCCAbCgAwIBAgIQRdrjoA5QN73fh1N17LXicDAKBggqhkjOPQQDAzBFMQsw
CQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxOVklESUEgQ29S
SU0gc2lnbmluZyBSb290IENBMCAXDTIzMDMxNjE1MzczNFoYDzIwNTMwMzA4MTUz
NzM0WjBFMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxO
VklESUEgQ29SSU0gc2lnbmluZyBSb290IENBMHYwEAYHKoZIzj0CAQYFK4EEACID
YgAEuECyi9vNM+Iw2lfUzyBldHAwaC1HF7TCgp12QcEyUTm3Tagxwr48d55+K2VI
lWYIDk7NlAIQdcV/Ff7euGLI+Qauj93HsSI4WX298PpW54RTgz9tC+Q684caR/BX
WEeZo2MwYTAdBgNVHQ4EFgQUpaXrOPK4ZDAk08DBskn594zeZjAwHwYDVR0jBBgw
FoAUpaXrOPK4ZDAk08DBskn594zeZjAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwCgYIKoZIzj0EAwMDZwAwZAIwHGDyscDP6ihHqRvZlI3eqZ4YkvjE
1duaN84tAHRVgxVMvNrp5Tnom3idHYGW/dskAjATvjIx6VzHm/4e2GiZAyZEIUBD
OKPzp5ei/A0iUZpdvngenDwV8Qa/wGdiTmJ7Bp4=
-----END CERTIFICATE-----
"""


def _at(now: int) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def report_fwid_matches(leaf: x509.Certificate, report: MeasurementReport) -> None:
    """The leaf certificate's TCG DICE FWID (its last 48 bytes, as on Hopper) is the report's FWID: the
    certified key belongs to the firmware that produced the report. Reports from older drivers carry no
    FWID (NVIDIA's 2023 sample); as in nvtrust, the check then rests on the signature alone, which covers
    the opaque data, so the field cannot be removed from a report that had it."""
    fwid = report.opaque.get("fwid")
    if fwid is None:
        return
    try:
        extension = leaf.extensions.get_extension_for_oid(OID_TCG_DICE_FWID).value
    except x509.ExtensionNotFound:
        raise EvidenceError("the GPU's attestation certificate has no FWID extension (2.23.133.5.4.1)") from None
    except MALFORMED as exc:
        raise EvidenceError(f"the GPU's attestation certificate is malformed: {exc}") from None
    raw = getattr(extension, "value", b"")
    if len(fwid) != 48 or raw[-48:] != fwid:
        raise EvidenceError("the GPU report's FWID differs from its attestation certificate's")


def signed_by(leaf: x509.Certificate, report: MeasurementReport) -> MeasurementReport:
    """``report`` if the GPU certified by ``leaf`` made and signed it (FWID, then ECDSA P-384 / SHA-384)."""
    report_fwid_matches(leaf, report)
    try:
        key = leaf.public_key()
    except MALFORMED as exc:
        raise EvidenceError(f"the GPU's attestation certificate is malformed: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError("the GPU's attestation certificate does not hold an ECDSA P-384 key")
    half = len(report.signature) // 2
    r, s = int.from_bytes(report.signature[:half], "big"), int.from_bytes(report.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError("the GPU report's signature does not verify with its attestation certificate") from None
    return report


def _golden_values(rim: Rim) -> tuple[tuple[int, bool, tuple[bytes, ...]], ...]:
    return tuple(sorted((i, m.active, m.alternatives) for i, m in rim.measurements.items()))


def _chip(leaf: x509.Certificate) -> str:
    """The GPU's chip as its attestation certificate names it ("GH100 A01 GSP FMC LF" -> "GH100"): a RIM
    is for one chip (its product), and RIMs of one version for two chips must not stand in for each other."""
    try:
        names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except MALFORMED:
        return ""
    return str(names[0].value).split(" ", 1)[0] if names else ""


def compare_measurements(report: MeasurementReport, driver: Rim, vbios: Rim) -> None:
    """Every active golden measurement (RIM index i = SPDM block i + 1) matches the report, or an error
    naming each index that does not, with the RIM it comes from."""
    from modelseal.attest.nvidia_rim import golden_measurements

    golden = golden_measurements(driver, vbios)
    skip_nvdec = report.opaque.get("nvdec0_status") == NVDEC0_DISABLED
    mismatched = [
        f"{index} ({'driver' if index in driver.measurements and driver.measurements[index].active else 'VBIOS'})"
        for index, allowed in sorted(golden.items())
        if not (index == NVDEC0_INDEX and skip_nvdec) and report.measurements.get(index + 1) not in allowed
    ]
    if mismatched:
        raise EvidenceError(
            f"GPU measurement(s) {', '.join(mismatched)} differ from NVIDIA's golden values in the RIMs"
        )


class NvidiaGpuVerifier:
    kind = KIND_NAME

    def __init__(
        self,
        device_root: bytes = NVIDIA_DEVICE_ROOT,
        rim_root: bytes = NVIDIA_RIM_ROOT,
        rims: tuple[bytes, ...] = (),
        host_rims: bool = False,
        require_ocsp: bool = False,
    ) -> None:
        self.device_root = load_root(device_root, "NVIDIA device identity root")
        self.rim_root = load_root(rim_root, "NVIDIA RIM root")
        self.rims = rims  # RIM documents the owner configured
        self.host_rims = host_rims
        self.require_ocsp = require_ocsp
        self._verified: OrderedDict[bytes, Rim] = OrderedDict()  # by SHA-256 of the document
        self._lock = threading.Lock()

    def verified_rim(self, document: bytes, what: str, now: int) -> Rim:
        """``document`` verified to the RIM root, at most once while its chain is valid: verifying a RIM is a
        pure function of its bytes and the root, ~6 ms, so the answer is kept (the last 64) and only the
        time is checked again."""
        from modelseal.attest.nvidia_rim import verify_rim

        digest, at = hashlib.sha256(document).digest(), _at(now)
        with self._lock:
            rim = self._verified.get(digest)
            if rim is not None:
                self._verified.move_to_end(digest)
        if rim is None or not rim.not_before <= at <= rim.not_after:
            rim = verify_rim(document, root=self.rim_root, at=at, what=what)
            with self._lock:
                self._verified[digest] = rim
                while len(self._verified) > 64:
                    self._verified.popitem(last=False)
        return rim

    def documents(self, evidence: dict[str, Any]) -> list[tuple[str, bytes]]:
        """The RIM documents to choose from: the owner's, and the host's only where the owner said so.

        NVIDIA signs its test RIMs with the same chain as its production RIMs (nvtrust's test_no_gpu and
        PROD VBIOS RIMs for 96.00.5E.00.01 differ only in golden values), so a signature alone does not
        make a RIM one the owner meant to accept: by default only configured RIMs count."""
        attached = evidence.get("rims", [])
        if not isinstance(attached, list) or len(attached) > MAX_ATTACHED_RIMS:
            raise EvidenceError(f"nvidia-gpu evidence 'rims' must be a list of at most {MAX_ATTACHED_RIMS} RIMs")
        documents = [(f"configured RIM {i}", d) for i, d in enumerate(self.rims)]
        if not self.host_rims:
            return documents
        for position, text in enumerate(attached):
            document = evidence_bytes({"rim": text}, "rim", KIND_NAME) or b""
            if len(document) > MAX_RIM:
                raise EvidenceError(f"attached RIM {position} is {len(document)} bytes, more than {MAX_RIM}")
            documents.append((f"attached RIM {position}", document))
        return documents

    def check_ocsp(self, gpu: dict[str, Any], chain: list[x509.Certificate], now: int) -> None:
        """Revocation, from the OCSP responses the host attached (``ocsp``: base64 DER, one per certificate
        below the root): required with ``nvidia_ocsp = true``, and checked whenever present."""
        attached = gpu.get("ocsp")
        if attached is None:
            if self.require_ocsp:
                raise EvidenceError("the GPU evidence has no OCSP responses, which this key service requires")
            return
        if not isinstance(attached, list) or len(attached) > MAX_OCSP:
            raise EvidenceError(f"nvidia-gpu evidence 'ocsp' must be a list of at most {MAX_OCSP} responses")
        ders = [evidence_bytes({"ocsp": item}, "ocsp", KIND_NAME) or b"" for item in attached]
        check_chain_revocation(chain, ders, now, "GPU certificate chain")

    def pick(self, documents: list[tuple[str, bytes]], chip: str, version: str, what: str, now: int) -> Rim:
        """The RIM for this GPU's chip and version. Only documents naming the version in their text are
        verified (an unknown version costs a text search, not a signature check per RIM); one that does not
        verify (an expired signer) is skipped; configured RIMs come before attached ones; and two that
        verify with different golden values are refused as ambiguous, never chosen between by order."""
        needle = f'colloquialversion="{version.lower()}"'.encode()
        found: dict[bool, list[Rim]] = {True: [], False: []}
        failures = []
        for origin, document in documents:
            if needle not in document.lower():
                continue
            try:
                rim = self.verified_rim(document, f"{what} ({origin})", now)
            except EvidenceError as exc:
                failures.append(str(exc))
                continue
            if rim.colloquial_version.lower() == version.lower() and rim.product == chip:
                found[origin.startswith("configured")].append(rim)
        candidates = found[True] or found[False]
        if not candidates:
            hint = "" if self.host_rims else " (RIMs a host attaches count only with nvidia_host_rims = true)"
            why = f"; {failures[0]}" if failures else ""
            raise EvidenceError(f"no {what} for {chip} version {version} is configured{hint}{why}")
        if len({_golden_values(rim) for rim in candidates}) > 1:
            raise EvidenceError(
                f"{len(candidates)} {what}s for {chip} {version} with different golden values are configured "
                "(NVIDIA's test and production RIMs share a version): keep only the one you accept"
            )
        return candidates[0]

    def authenticate(self, raw: bytes, chain: list[x509.Certificate], now: int) -> MeasurementReport:
        """The report, parsed, if NVIDIA's device root vouches for it: chain, FWID and signature."""
        report = parse_report(raw)
        verify_chain(chain, self.device_root, now, "GPU certificate chain")
        return signed_by(chain[0], report)

    def verify_gpu(self, gpu: Any, rims: list[tuple[str, bytes]], ctx: VerificationContext, position: int) -> Claims:
        if not isinstance(gpu, dict):
            raise EvidenceError(f"GPU {position}: evidence must be an object")
        pem = gpu.get("cert_chain")
        if not isinstance(pem, str):
            raise EvidenceError("nvidia-gpu evidence has no 'cert_chain' (PEM, leaf first)")
        chain = load_pem_chain(pem.encode(), "GPU certificate chain")
        report = self.authenticate(evidence_bytes(gpu, "report", KIND_NAME) or b"", chain, ctx.now)
        self.check_ocsp(gpu, chain, ctx.now)
        driver_version = report.text("driver_version")
        vbios_version = report.vbios_version
        chip = _chip(chain[0])
        driver = self.pick(rims, chip, driver_version, "driver RIM", ctx.now)
        vbios = self.pick(rims, chip, vbios_version, "VBIOS RIM", ctx.now)
        compare_measurements(report, driver, vbios)
        claims = Claims(
            kind=KIND_NAME,
            measurements={
                "gpu_model": driver.product,
                "driver_version": driver_version,
                "vbios_version": vbios_version,
                "rim_match": "true",
            },
            debug=False,
            details={
                "fwid": report.opaque.get("fwid", b"").hex() or None,
                "project": report.text("project"),
                "chip_sku": report.text("chip_sku"),
                "driver_rim": driver.tag_id,
                "vbios_rim": vbios.tag_id,
                "certificate": chain[min(1, len(chain) - 1)].subject.rfc4514_string(),
                "attestation_key": spki_hash(chain[0]).hex(),
            },
        )
        claims.report_data = report.request_nonce.hex()
        claims.report_data_bound = ctx.binding is not None and report.request_nonce == ctx.binding
        if ctx.binding is not None and not claims.report_data_bound:
            claims.details["binding_mismatch"] = (
                f"GPU {position}'s nonce {report.request_nonce.hex()} is not this exchange's binding "
                f"{ctx.binding.hex()}"
            )
        reported = gpu.get("host_reported")
        if isinstance(reported, dict):  # what NVML told the agent: shown, never a claim
            claims.details["host_reported"] = {str(k)[:40]: str(v)[:80] for k, v in list(reported.items())[:8]}
        return claims

    def verify(self, evidence: dict[str, Any], ctx: VerificationContext) -> Claims:
        gpus = evidence.get("gpus")
        if not isinstance(gpus, list) or not gpus:
            raise EvidenceError("nvidia-gpu evidence has no 'gpus' list")
        if len(gpus) > MAX_GPUS:
            raise EvidenceError(f"nvidia-gpu evidence lists {len(gpus)} GPUs, more than {MAX_GPUS}")
        rims = self.documents(evidence)
        parts = []
        for position, gpu in enumerate(gpus):
            try:
                parts.append(self.verify_gpu(gpu, rims, ctx, position))
            except EvidenceError as exc:
                raise EvidenceError(f"GPU {position}: {exc}" if len(gpus) > 1 else str(exc)) from None
        seen: dict[str, int] = {}
        for position, part in enumerate(parts):  # gpu_count counts GPUs, not reports: one GPU, one entry
            first = seen.setdefault(part.details["attestation_key"], position)
            if first != position:
                raise EvidenceError(f"GPU {position} is GPU {first} again (same attestation key): each GPU counts once")
        common = {
            name: value
            for name, value in parts[0].measurements.items()
            if all(p.measurements.get(name) == value for p in parts)
        }
        claims = Claims(
            kind=KIND_NAME,
            measurements={**common, "gpu_count": str(len(parts))},
            debug=False,
            details={"gpus": [p.to_json() for p in parts]},
            parts=parts,
        )
        unbound = [p for p in parts if not p.report_data_bound]
        claims.report_data = parts[0].report_data
        claims.report_data_bound = not unbound
        if unbound and ctx.binding is not None:
            claims.details["binding_mismatch"] = unbound[0].details.get("binding_mismatch", "")
        return claims

    def check_requirement(self, requirement: dict[str, Any]) -> dict[str, Any]:
        return normalise_requirement(requirement)


def _read_pem_setting(settings: Mapping[str, Any], name: str, base: Path | None, default: bytes) -> bytes:
    value = settings.get(name)
    if value is None:
        return default
    path = Path(str(value)) if base is None or Path(str(value)).is_absolute() else base / str(value)
    try:
        data = path.read_bytes()
        x509.load_pem_x509_certificate(data)
    except OSError as exc:
        raise UsageError(f"[attestation] {name}: cannot read {path}: {exc.strerror}") from None
    except (ValueError, x509.InvalidVersion):
        raise UsageError(f"[attestation] {name}: {path} is not a PEM certificate") from None
    return data


def _rim_files(settings: Mapping[str, Any], base: Path | None) -> tuple[bytes, ...]:
    entries = settings.get("nvidia_rims", [])
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise UsageError("[attestation] nvidia_rims must be a list of RIM files or directories")
    files: list[Path] = []
    for entry in entries:
        path = Path(entry) if base is None or Path(entry).is_absolute() else base / entry
        files.extend(sorted(path.glob("*.swidtag")) if path.is_dir() else [path])
    documents = []
    for path in files:
        try:
            documents.append(path.read_bytes())
        except OSError as exc:
            raise UsageError(f"[attestation] nvidia_rims: cannot read {path}: {exc.strerror}") from None
    return tuple(documents)


def _flag(settings: Mapping[str, Any], name: str) -> bool:
    value = settings.get(name, False)
    if not isinstance(value, bool):
        raise UsageError(f"[attestation] {name} must be true or false")
    return value


def _verifier(settings: Mapping[str, Any], base: Path | None) -> NvidiaGpuVerifier:
    return NvidiaGpuVerifier(
        device_root=_read_pem_setting(settings, "nvidia_device_root", base, NVIDIA_DEVICE_ROOT),
        rim_root=_read_pem_setting(settings, "nvidia_rim_root", base, NVIDIA_RIM_ROOT),
        rims=_rim_files(settings, base),
        host_rims=_flag(settings, "nvidia_host_rims"),
        require_ocsp=_flag(settings, "nvidia_ocsp"),
    )


# --- the host side -------------------------------------------------------------------------------------


def evidence_from_nvml(report_struct: Any, cert_struct: Any) -> dict[str, Any]:
    """One GPU's evidence from NVML's structures (``c_nvmlConfComputeGpuAttestationReport_t`` and
    ``c_nvmlConfComputeGpuCertificate_t``): their sizes are checked against their buffers, never trusted."""
    size = int(report_struct.attestationReportSize)
    buffer = bytes(report_struct.attestationReport)
    if not 0 < size <= len(buffer):
        raise EvidenceError(f"NVML returned an attestation report of {size} bytes (buffer {len(buffer)})")
    chain_size = int(cert_struct.attestationCertChainSize)
    chain_buffer = bytes(cert_struct.attestationCertChain)
    if not 0 < chain_size <= len(chain_buffer):
        raise EvidenceError(f"NVML returned an attestation certificate chain of {chain_size} bytes")
    try:
        pem = chain_buffer[:chain_size].decode("ascii")
    except UnicodeDecodeError:
        raise EvidenceError("NVML's attestation certificate chain is not PEM text") from None
    return {"report": b64e(buffer[:size]), "cert_chain": pem}


def attach_rims(evidence: dict[str, Any], rims: list[Path]) -> None:
    """Attach, once each, the host's copies of NVIDIA's RIMs for the GPUs' driver and VBIOS versions (found
    by the file's colloquialVersion, read without trusting it: the key service verifies the signature)."""
    wanted = set()
    for gpu in evidence["gpus"]:
        report = parse_report(evidence_bytes(gpu, "report", KIND_NAME) or b"")
        wanted |= {report.text("driver_version").lower(), report.vbios_version.lower()}
    attached = []
    for path in rims:
        try:
            text = path.read_bytes()[:MAX_RIM]
        except OSError:
            continue
        if any(f'colloquialversion="{version}"'.encode() in text.lower() for version in wanted):
            attached.append(b64e(text))
    if attached:
        evidence["rims"] = attached[:MAX_ATTACHED_RIMS]


def fetch_ocsp(chain_pem: str, url: str, timeout: float = 10.0) -> list[str]:
    """The responder's answers for every certificate of a GPU chain below its root (base64 DER, for the
    evidence's ``ocsp``): the host fetches them, the key service verifies them."""
    import httpx

    chain = load_pem_chain(chain_pem.encode(), "GPU certificate chain")
    answers = []
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for cert, issuer in itertools.pairwise(chain):
            try:
                response = client.post(
                    url, content=request_for(cert, issuer), headers={"Content-Type": "application/ocsp-request"}
                )
            except httpx.HTTPError as exc:
                raise EvidenceError(f"the OCSP responder {url} cannot be reached: {exc}") from None
            if response.status_code != 200 or len(response.content) > 16 * 1024:
                raise EvidenceError(f"the OCSP responder {url} answered {response.status_code}")
            answers.append(b64e(response.content))
    return answers


class NvidiaGpuCollector:
    """Every (or the configured) GPU's report from NVML with nonce = binding, its certificate chain, and the
    RIMs found in the agent's ``[nvidia] rims`` directory, and with ``[nvidia] ocsp_url`` the OCSP answers
    for its certificates. Needs ``nvidia-ml-py`` (``modelseal[nvidia]``), a
    confidential VM with the GPUs in CC mode, and read access to ``/dev/nvidia*`` (docs/attestation.md)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        gpus = settings.get("gpus")
        if gpus is not None and (
            not isinstance(gpus, list)
            or not all(type(i) is int and i >= 0 for i in gpus)
            or len(set(gpus)) != len(gpus)
        ):
            raise UsageError("[nvidia] gpus must be a list of distinct GPU indices")
        self.gpus: list[int] | None = gpus
        rims = settings.get("rims")
        self.rims = sorted(Path(str(rims)).glob("*.swidtag")) if rims else []
        ocsp_url = settings.get("ocsp_url")
        if ocsp_url is not None and (not isinstance(ocsp_url, str) or not ocsp_url.startswith(("https://", "http://"))):
            raise UsageError("[nvidia] ocsp_url must be an http(s) URL (NVIDIA's: https://ocsp.ndis.nvidia.com)")
        self.ocsp_url: str | None = ocsp_url

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        try:
            import pynvml  # nvidia-ml-py: imported only on a host configured to present GPU evidence
        except ImportError:
            raise EvidenceError("nvidia-gpu evidence needs nvidia-ml-py: pip install 'modelseal[nvidia]'") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise EvidenceError(f"NVML cannot start (no NVIDIA driver?): {exc}") from None
        try:
            state = pynvml.nvmlSystemGetConfComputeState()
            if not state.ccFeature:
                raise EvidenceError("the GPUs are not in confidential-computing mode (NVML ccFeature is off)")
            indices = self.gpus if self.gpus is not None else list(range(pynvml.nvmlDeviceGetCount()))
            gpus = []
            for index in indices:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpu = evidence_from_nvml(
                    pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, binding),
                    pynvml.nvmlDeviceGetConfComputeGpuCertificate(handle),
                )
                gpu["host_reported"] = {"cc_feature": state.ccFeature, "devtools_mode": state.devToolsMode}
                if self.ocsp_url:
                    gpu["ocsp"] = fetch_ocsp(gpu["cert_chain"], self.ocsp_url)
                gpus.append(gpu)
        except pynvml.NVMLError as exc:
            raise EvidenceError(f"NVML could not produce GPU evidence: {exc}") from None
        finally:
            pynvml.nvmlShutdown()
        evidence = {"kind": KIND_NAME, "gpus": gpus}
        attach_rims(evidence, self.rims)
        return evidence


KIND = AttestationKind(
    KIND_NAME,
    verifier=_verifier,
    collector=NvidiaGpuCollector,
    settings=("nvidia_device_root", "nvidia_rim_root", "nvidia_rims", "nvidia_host_rims", "nvidia_ocsp"),
    agent_table="nvidia",
    agent_keys=("gpus", "rims", "ocsp_url"),
)
