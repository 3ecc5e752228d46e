"""Evidence the agent produces for a release, one collector per kind, selected and configured by the
agent's config file. Each collector gets the exchange's binding (to put in its report data or TPM nonce)
and returns the evidence document the key service's verifier of that kind reads.

- ``mtls``: nothing to collect; the TLS handshake is the proof.
- ``tpm``: a quote from the host's TPM 2.0 (``tpm2-tools``; a device, the kernel resource manager or
  ``swtpm``, by TCTI) with an attestation key enrolled by ``modelseal agent tpm-enroll``.
- ``tdx`` / ``sev-snp``: a report from the guest kernel's configfs-tsm interface
  (``/sys/kernel/config/tsm/report``); TDX quotes get their collateral from a PCCS, SNP reports their
  certificates from the report's auxiliary blob or from configured files.
- ``sgx``: a quote from Gramine's ``/dev/attestation`` pseudo-files, with collateral from a PCCS.

Only public data touches disk (the TPM tools exchange quotes through a private temporary directory).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from modelseal.attest.base import REPORT_DATA_SIZE, EvidenceError, expected_report_data
from modelseal.attest.tpm_tools import TpmCollector
from modelseal.encoding import b64e
from modelseal.errors import UsageError

Collector = Callable[[bytes, bytes], dict[str, Any]]
TSM_REPORTS = "/sys/kernel/config/tsm/report"


def pccs_collateral(pccs_url: str, quote: bytes) -> dict[str, Any]:
    """Collateral for a DCAP quote from a PCCS (Intel-signed, so the service can check it)."""
    try:
        import dcap_qvl
    except ImportError:
        raise EvidenceError("collecting SGX/TDX evidence needs dcap-qvl: pip install 'modelseal[agent]'") from None
    try:
        collateral = asyncio.run(dcap_qvl.get_collateral(pccs_url, quote))
    except (ValueError, RuntimeError) as exc:
        raise EvidenceError(f"cannot fetch DCAP collateral from {pccs_url}: {exc}") from None
    return dict(json.loads(collateral.to_json()))


# GUIDs of the SEV-SNP extended-report certificate table (GHCB spec), compared in both byte orders.
SNP_CERT_GUIDS = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
}


def snp_cert_table(table: bytes) -> dict[str, bytes]:
    """Split an SNP certificate table (GUID, offset, length entries, zero-terminated) into DER certs."""
    import uuid

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


class TsmCollector:
    """A TDX quote or SEV-SNP report from configfs-tsm, with the binding as report data."""

    PROVIDERS: ClassVar[dict[str, str]] = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}

    def __init__(self, kind: str, settings: dict[str, Any]) -> None:
        self.kind, self.settings = kind, settings
        self.root = Path(settings.get("path", TSM_REPORTS))
        if kind == "tdx" and not settings.get("pccs_url"):
            raise UsageError('evidence "tdx" needs [tsm] pccs_url to fetch the quote\'s collateral')

    def report(self, binding: bytes) -> tuple[bytes, bytes]:
        if not self.root.is_dir():
            raise EvidenceError(
                f"{self.root} does not exist: this is not a confidential VM with configfs-tsm "
                "(Linux 6.7+, `mount -t configfs none /sys/kernel/config`)"
            )
        entry = self.root / f"modelseal-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            entry.mkdir()
            provider = (entry / "provider").read_text().strip()
            if provider != self.PROVIDERS[self.kind]:
                raise EvidenceError(f"configfs-tsm provider is {provider}, not {self.PROVIDERS[self.kind]}")
            (entry / "inblob").write_bytes(expected_report_data(binding))
            generation = (entry / "generation").read_text()
            out = (entry / "outblob").read_bytes()
            aux = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
            if (entry / "generation").read_text() != generation:
                raise EvidenceError("another process changed the configfs-tsm request mid-way; try again")
            return out, aux
        except OSError as exc:
            raise EvidenceError(f"configfs-tsm at {self.root}: {exc.strerror or exc}") from None
        finally:
            try:
                entry.rmdir()
            except OSError:
                pass

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        out, aux = self.report(binding)
        if self.kind == "tdx":
            collateral = pccs_collateral(str(self.settings["pccs_url"]), out)
            return {"kind": "tdx", "quote": b64e(out), "collateral": collateral}
        certs = snp_cert_table(aux) if aux else {}
        vcek = certs.get("vcek") or _read_setting_file(self.settings, "vcek")
        chain = _read_setting_file(self.settings, "cert_chain") if "cert_chain" in self.settings else None
        if chain is None:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            if not ("ask" in certs and "ark" in certs):
                raise EvidenceError("the host gave no ASK/ARK certificates; set [tsm] cert_chain to AMD's PEM chain")
            pems = (x509.load_der_x509_certificate(certs[n]).public_bytes(Encoding.PEM) for n in ("ask", "ark"))
            chain = b"".join(pems)
        return {"kind": "sev-snp", "report": b64e(out), "vcek": b64e(vcek), "cert_chain": chain.decode()}


def _read_setting_file(settings: dict[str, Any], name: str) -> bytes:
    path = settings.get(name)
    if not path:
        raise EvidenceError(f"the host gave no {name.upper()} certificate; set [tsm] {name} to its file")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EvidenceError(f"[tsm] {name}: cannot read {path}: {exc.strerror}") from None


class GramineCollector:
    """An SGX quote from Gramine's ``/dev/attestation`` (the enclave's own report data)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.root = Path(settings.get("path", "/dev/attestation"))
        self.pccs_url = str(settings.get("pccs_url", ""))
        if not self.pccs_url:
            raise UsageError('evidence "sgx" needs [sgx] pccs_url to fetch the quote\'s collateral')

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        try:
            kind = (self.root / "attestation_type").read_text().strip()
            if kind != "dcap":
                raise EvidenceError(f"Gramine attestation type is {kind!r}; modelseal needs 'dcap'")
            (self.root / "user_report_data").write_bytes(expected_report_data(binding)[:REPORT_DATA_SIZE])
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise EvidenceError(
                f"{self.root}: {exc.strerror or exc} (run the agent inside a Gramine SGX enclave with "
                'sgx.remote_attestation = "dcap")'
            ) from None
        return {"kind": "sgx", "quote": b64e(quote), "collateral": pccs_collateral(self.pccs_url, quote)}


def build_collectors(kinds: list[str], settings: dict[str, dict[str, Any]]) -> dict[str, Collector]:
    """Collectors for the configured evidence kinds; unknown kinds or missing settings fail at start-up."""
    collectors: dict[str, Collector] = {"mtls": lambda binding, nonce: {"kind": "mtls"}}
    if "none" in kinds and len(set(kinds) - {"mtls", "none"}) > 0:
        raise UsageError('evidence "none" (no TEE or TPM evidence) cannot be combined with other kinds')
    for kind in kinds:
        if kind in ("mtls", "none"):  # none: this host presents only its TLS identity
            continue
        if kind == "tpm":
            tpm = settings.get("tpm", {})
            if "tcti" not in tpm:
                raise UsageError('evidence "tpm" needs [tpm] tcti (e.g. "device:/dev/tpmrm0")')
            collectors[kind] = TpmCollector(str(tpm["tcti"]), str(tpm.get("ak_handle", "0x81010002")),
                                            str(tpm.get("pcrs", "sha256:0,1,2,3,4,5,6,7")))  # fmt: skip
        elif kind in TsmCollector.PROVIDERS:
            collectors[kind] = TsmCollector(kind, settings.get("tsm", {}))
        elif kind == "sgx":
            collectors[kind] = GramineCollector(settings.get("sgx", {}))
        else:
            raise UsageError(f"unknown evidence kind {kind!r} (none, mtls, tpm, tdx, sev-snp, sgx)")
    return collectors


def collect(collectors: dict[str, Collector], kinds: list[str], binding: bytes, nonce: bytes) -> list[dict[str, Any]]:
    """Evidence of every requested kind this host can produce (the service refuses what is missing)."""
    return [collectors[k](binding, nonce) for k in dict.fromkeys(kinds) if k in collectors]
