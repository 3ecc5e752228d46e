"""The agent's evidence configuration and the parts of TEE collection that run without TEE hardware:
configuration errors at start-up, clear errors where the TEE interface is absent, and the SEV-SNP
certificate table (built from the real Milan certificates)."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from modelseal.attest import EvidenceError, collectors_from_config
from modelseal.attest.sgx import GramineCollector
from modelseal.attest.snp import SNP_CERT_GUIDS, SnpCollector, snp_cert_table
from modelseal.errors import UsageError

SNP = Path(__file__).parent / "data" / "attestation" / "snp"


@pytest.mark.parametrize(
    ("kinds", "settings", "message"),
    [
        (["tpm"], {}, r"needs \[tpm\] tcti"),
        (["tdx"], {}, r"needs \[tsm\] pccs_url"),
        (["sgx"], {}, r"needs \[sgx\] pccs_url"),
        (["sgxx"], {}, "unknown evidence kind 'sgxx'"),
        (["none", "tpm"], {"tpm": {"tcti": "device:/dev/tpmrm0"}}, "cannot be combined"),
    ],
)
def test_bad_evidence_configuration_fails_at_start(kinds: list[str], settings: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError, match=message):
        collectors_from_config(kinds, settings)


def test_none_and_mtls_present_only_the_tls_identity() -> None:
    collectors = collectors_from_config(["none"], {})
    assert set(collectors) == {"mtls"}
    assert collectors["mtls"](bytes(32), bytes(32)) == {"kind": "mtls"}


def test_missing_tee_interfaces_are_named(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="not a confidential VM with configfs-tsm"):
        SnpCollector({"path": str(tmp_path / "tsm")})(bytes(32), b"")
    with pytest.raises(EvidenceError, match="inside a Gramine SGX enclave"):
        GramineCollector({"path": str(tmp_path / "attestation"), "pccs_url": "https://pccs.invalid"})(bytes(32), b"")


def cert_table(entries: dict[str, bytes], little_endian: bool) -> bytes:
    header = b""
    blobs = b""
    offset = 24 * (len(entries) + 1)
    for name, der in entries.items():
        guid = uuid.UUID(SNP_CERT_GUIDS[name])
        header += (guid.bytes_le if little_endian else guid.bytes) + struct.pack("<II", offset + len(blobs), len(der))
        blobs += der
    return header + bytes(24) + blobs


@pytest.mark.parametrize("little_endian", [True, False])
def test_snp_certificate_table_yields_the_real_certificates(little_endian: bool) -> None:
    vcek = (SNP / "vcek_milan.der").read_bytes()
    ask, ark = (
        c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates((SNP / "cert_chain_milan").read_bytes())
    )
    table = cert_table({"vcek": vcek, "ask": ask, "ark": ark}, little_endian)
    assert snp_cert_table(table) == {"vcek": vcek, "ask": ask, "ark": ark}
    with pytest.raises(EvidenceError, match="points past its end"):
        snp_cert_table(table[:-10])


@given(st.binary(max_size=200))
def test_snp_certificate_table_rejects_garbage_cleanly(data: bytes) -> None:
    try:
        snp_cert_table(data)
    except EvidenceError:
        pass
