"""TPM 2.0 quotes from a real software TPM (swtpm + tpm2-tools), verified by modelseal's TPM verifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelseal.attest import EvidenceError, VerificationContext, get_verifier
from modelseal.attest import tpm_structs as ts
from modelseal.attest.tpm import TpmCollector
from modelseal.attest.tpm_tools import enroll
from modelseal.encoding import b64d, b64e

from .services import SoftwareTpm

PCRS = "sha256:0,7,16"
BINDING = bytes(range(32))


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftwareTpm]:
    with SoftwareTpm(tmp_path_factory.mktemp("swtpm")) as tpm:
        yield tpm


@pytest.fixture(scope="module")
def enrolled(swtpm: SoftwareTpm) -> dict[str, Any]:
    return enroll(swtpm.tcti, pcrs=PCRS)


@pytest.fixture(scope="module")
def evidence(swtpm: SoftwareTpm, enrolled: dict[str, Any]) -> dict[str, Any]:
    return TpmCollector(swtpm.tcti, enrolled["handle"], PCRS)(BINDING, b"")


def verify(evidence: dict[str, Any], binding: bytes | None = BINDING) -> Any:
    verifier = get_verifier("tpm")
    assert verifier is not None
    return verifier.verify(evidence, VerificationContext(None, binding, b"", 0))


def flipped(evidence: dict[str, Any], field: str, byte: int, bit: int = 0) -> dict[str, Any]:
    raw = bytearray(b64d(evidence[field]))
    raw[byte] ^= 1 << bit
    return {**evidence, field: b64e(bytes(raw))}


def test_genuine_quote_verifies_with_pcrs_and_binding(enrolled: dict[str, Any], evidence: dict[str, Any]) -> None:
    claims = verify(evidence)
    assert claims.report_data_bound and claims.measurements["ak"] == enrolled["ak_name"]
    assert claims.measurements == enrolled["requirement"]["measurements"]  # what enrolment told the owner
    assert set(claims.measurements) == {"ak", "pcr.sha256.0", "pcr.sha256.7", "pcr.sha256.16"}
    verifier = get_verifier("tpm")
    assert verifier is not None
    from modelseal.attest.base import unmet

    assert unmet(verifier.check_requirement(enrolled["requirement"]), claims) is None


def test_enrol_again_keeps_the_persisted_key(swtpm: SoftwareTpm, enrolled: dict[str, Any]) -> None:
    again = enroll(swtpm.tcti, pcrs=PCRS)
    assert not again["created"] and again["ak_name"] == enrolled["ak_name"]


def test_wrong_nonce_is_not_bound(evidence: dict[str, Any]) -> None:
    claims = verify(evidence, binding=bytes(32))
    assert not claims.report_data_bound
    assert "is not this exchange's binding" in claims.details["binding_mismatch"]


@pytest.mark.parametrize(
    ("field", "byte", "message"),
    [
        ("quote", 40, "signature does not verify"),  # inside extraData (the nonce)
        ("quote", -5, "signature does not verify"),  # inside the signed PCR digest
        ("signature", 10, "signature does not verify"),  # r
        ("signature", -3, "signature does not verify"),  # s
        ("ak_public", 60, "ECC point is not on its curve"),  # the AK's public point
        ("ak_public", 7, "not a restricted, TPM-resident signing key"),  # objectAttributes.restricted
    ],
)
def test_one_bit_changes_are_rejected(evidence: dict[str, Any], field: str, byte: int, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        verify(flipped(evidence, field, byte))


def test_presented_pcr_values_must_match_the_signed_digest(evidence: dict[str, Any]) -> None:
    pcrs = json.loads(json.dumps(evidence["pcrs"]))
    pcrs["sha256"]["16"] = "00" * 31 + "01"
    with pytest.raises(EvidenceError, match="do not match the digest the TPM signed"):
        verify({**evidence, "pcrs": pcrs})
    del pcrs["sha256"]["7"]
    with pytest.raises(EvidenceError, match="lacks PCR sha256:7"):
        verify({**evidence, "pcrs": pcrs})


def test_an_unrestricted_key_cannot_vouch_for_a_quote(swtpm: SoftwareTpm, tmp_path: Path) -> None:
    """A plain signing key could sign forged TPMS_ATTEST bytes; the verifier insists on a restricted AK."""
    swtpm.tool("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", str(tmp_path / "p.ctx"))
    swtpm.tool("tpm2_create", "-C", str(tmp_path / "p.ctx"), "-G", "ecc:ecdsa", "-u", str(tmp_path / "k.pub"),
               "-r", str(tmp_path / "k.priv"))  # fmt: skip
    swtpm.tool("tpm2_flushcontext", "-t")
    swtpm.tool("tpm2_load", "-C", str(tmp_path / "p.ctx"), "-u", str(tmp_path / "k.pub"), "-r",
               str(tmp_path / "k.priv"), "-c", str(tmp_path / "k.ctx"))  # fmt: skip
    swtpm.tool("tpm2_flushcontext", "-t")
    swtpm.tool("tpm2_evictcontrol", "-C", "o", "-c", str(tmp_path / "k.ctx"), "0x81010009")
    swtpm.tool("tpm2_flushcontext", "-t")
    evidence = TpmCollector(swtpm.tcti, "0x81010009", PCRS)(BINDING, b"")
    with pytest.raises(EvidenceError, match="not a restricted, TPM-resident signing key"):
        verify(evidence)


def test_a_tpm_requirement_must_pin_the_attestation_key() -> None:
    verifier = get_verifier("tpm")
    assert verifier is not None
    with pytest.raises(EvidenceError, match="must pin the host's attestation key"):
        verifier.check_requirement({"kind": "tpm", "measurements": {"pcr.sha256.16": "00" * 32}})
    with pytest.raises(EvidenceError, match="unknown field"):
        verifier.check_requirement({"kind": "tpm", "measurement": {"ak": "x"}})


def test_cli_verifies_agent_evidence_and_names_failures(evidence: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(evidence))
    cmd = [sys.executable, "-m", "modelseal", "attest", "verify", str(path), "--json"]
    ok = subprocess.run([*cmd, "--binding", BINDING.hex()], capture_output=True, text=True, env={**os.environ})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verified"] is True
    bad = subprocess.run([*cmd, "--binding", "ab" * 32], capture_output=True, text=True)
    assert bad.returncode == 1 and "is not this exchange's binding" in bad.stderr and "Traceback" not in bad.stderr
    path.write_text(json.dumps(flipped(evidence, "signature", 12)))
    forged = subprocess.run(cmd, capture_output=True, text=True)
    assert forged.returncode == 1 and "signature does not verify" in forged.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_parsers_reject_garbage_cleanly(data: bytes) -> None:
    """Arbitrary bytes are either a structure or an EvidenceError, never an IndexError or a struct.error."""
    for parse in (ts.parse_public, ts.parse_quote, ts.parse_signature):
        try:
            parse(data)
        except EvidenceError:
            pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["quote", "signature", "ak_public"]),
    position=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_bit_flip_in_the_evidence_is_rejected(
    enrolled: dict[str, Any], evidence: dict[str, Any], field: str, position: int, bit: int
) -> None:
    """Either verification fails, or (a changed AK attribute the TPM does not sign) the AK's name changes and
    the grant's pinned AK refuses it."""
    from modelseal.attest.base import unmet

    size = len(b64d(evidence[field]))
    try:
        claims = verify(flipped(evidence, field, position % size, bit))
    except EvidenceError:
        return
    assert claims.measurements["ak"] != enrolled["ak_name"]
    assert "measurement ak" in str(unmet(enrolled["requirement"], claims))
