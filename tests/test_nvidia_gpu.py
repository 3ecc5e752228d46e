"""The ``nvidia-gpu`` verifier against NVIDIA's public Hopper sample (tests/data/attestation/nvidia) and
against GPU evidence the tests make under their own roots (tests/gpu_evidence.py).

The genuine sample: an H100's SPDM 1.1 measurement report, requested with nonce 931d8dd0…cb (nvtrust's
hardware tests set it; the shared README's 4cff7f53… is the NVSwitch/no-GPU default), from driver 550.90.07
and VBIOS 96.00.9F.00.01; its certificate chain ends at NVIDIA's device identity root and never expires.
The sample RIMs are for driver 545.00 and VBIOS 96.00.5E.00.01: not this GPU's, so the sample is refused at
the RIM step, by version, and its measurements differ from those RIMs at named indices.
"""

from __future__ import annotations

import base64
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench.samples import NVIDIA_AT, NVIDIA_NONCE, nvidia_evidence
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelseal.attest import Claims, EvidenceError, VerificationContext
from modelseal.attest.base import unmet
from modelseal.attest.certchain import load_pem_chain
from modelseal.attest.nvidia import NVIDIA_DEVICE_ROOT, NvidiaGpuVerifier, evidence_from_nvml, signed_by
from modelseal.attest.spdm import parse_report
from modelseal.encoding import b64d, b64e
from tests.gpu_evidence import GpuUnderTestRoots, RimSignerUnderTestRoots, pem

DATA = Path(__file__).parent / "data" / "attestation" / "nvidia"
REPORT = bytes.fromhex((DATA / "hopperAttestationReport.txt").read_text().strip())
CHAIN_PEM = (DATA / "hopperCertChain.txt").read_bytes()
NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
AT = 1767225600  # 2026-01-01: inside every GPU certificate's validity
CHAIN = load_pem_chain(CHAIN_PEM, "GPU certificate chain")
VERIFIER = NvidiaGpuVerifier()
# NVIDIA's 2023 sample (nvtrust 08a50685e): the GPU the sample RIMs describe, asked with nonce 4cff7f53…2e
SAMPLE_2023, NONCE_2023 = nvidia_evidence(), NVIDIA_NONCE
RIMS = {
    "driver": (DATA / "Driver_RIM_test_no_gpu.swidtag").read_bytes(),
    "vbios": (DATA / "1010_0200_882_96005E0001_test_no_gpu.swidtag").read_bytes(),
    "prod": (DATA / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes(),
}
WITH_TEST_RIMS = NvidiaGpuVerifier(rims=(RIMS["driver"], RIMS["vbios"]))
RIM_AT = NVIDIA_AT  # 2024-06-01: inside the sample RIMs' signing certificates (2023-06-27 to 2025-06-22)
AT_2026_12 = 1796083200


def test_the_pinned_device_root_is_nvidias() -> None:
    assert NVIDIA_DEVICE_ROOT == (DATA / "verifier_device_root.pem").read_bytes().strip() + b"\n"


def test_genuine_sample_is_authentic_at_a_fixed_time_with_its_nonce() -> None:
    report = VERIFIER.authenticate(REPORT, CHAIN, AT)
    assert report.request_nonce == NONCE
    assert report.text("driver_version") == "550.90.07"
    assert report.vbios_version == "96.00.9F.00.01"
    assert len(report.measurements) == 64 and all(len(v) == 48 for v in report.measurements.values())
    assert report.opaque["fwid"].hex().startswith("f5c384ae")


def test_genuine_2025_sample_is_refused_by_version_against_the_2023_rims() -> None:
    evidence = {"kind": "nvidia-gpu", "gpus": [{"report": b64e(REPORT), "cert_chain": CHAIN_PEM.decode()}]}
    with pytest.raises(EvidenceError, match=r"no driver RIM for GH100 version 550\.90\.07 is configured"):
        WITH_TEST_RIMS.verify(evidence, VerificationContext(None, NONCE, b"", RIM_AT))


def test_genuine_2023_sample_verifies_end_to_end_at_a_fixed_time_with_its_nonce() -> None:
    claims = WITH_TEST_RIMS.verify(SAMPLE_2023, VerificationContext(None, NONCE_2023, b"", RIM_AT))
    assert claims.report_data_bound and claims.debug is False
    assert claims.measurements == {
        "gpu_model": "GH100", "driver_version": "545.00", "vbios_version": "96.00.5E.00.01",
        "rim_match": "true", "gpu_count": "1",
    }  # fmt: skip
    [gpu] = claims.parts
    assert gpu.details["certificate"].startswith("CN=GH100 A01 GSP BROM")
    assert gpu.details["fwid"] is None  # 2023 drivers put no FWID in the report
    other = WITH_TEST_RIMS.verify(SAMPLE_2023, VerificationContext(None, NONCE, b"", RIM_AT))
    assert not other.report_data_bound and "is not this exchange's binding" in other.details["binding_mismatch"]


def test_the_production_vbios_rim_does_not_accept_the_test_sample() -> None:
    """NVIDIA's PROD and test_no_gpu VBIOS RIMs for 96.00.5E.00.01 share tag id, version and signing chain
    and differ in golden values 1, 2, 3 and 9: the sample GPU is not in its production state, and is refused
    with those indices named, as NVIDIA's verifier does when it fetches the production RIM."""
    prod = NvidiaGpuVerifier(rims=(RIMS["driver"], RIMS["prod"]))
    named = r"^GPU measurement\(s\) 1 \(VBIOS\), 2 \(VBIOS\), 3 \(VBIOS\), 9 \(VBIOS\) differ"
    with pytest.raises(EvidenceError, match=named):
        prod.verify(SAMPLE_2023, VerificationContext(None, NONCE_2023, b"", RIM_AT))


def test_rims_a_host_attaches_count_only_where_the_owner_says_so() -> None:
    attached = {**SAMPLE_2023, "rims": [b64e(RIMS["driver"]), b64e(RIMS["vbios"])]}
    ctx = VerificationContext(None, NONCE_2023, b"", RIM_AT)
    with pytest.raises(EvidenceError, match="count only with nvidia_host_rims = true"):
        VERIFIER.verify(attached, ctx)
    assert NvidiaGpuVerifier(host_rims=True).verify(attached, ctx).measurements["rim_match"] == "true"


def test_rims_are_checked_at_the_verification_time() -> None:
    with pytest.raises(EvidenceError, match="expired at 2025-06"):
        WITH_TEST_RIMS.verify(SAMPLE_2023, VerificationContext(None, NONCE_2023, b"", AT_2026_12))


@pytest.mark.slow
@pytest.mark.parametrize("bit", range(8))
def test_every_single_bit_change_in_the_report_is_refused(bit: int) -> None:
    """Exhaustive: each of the report's 4117 bytes with this bit flipped, through the strict parser, the FWID
    check and the signature (the chain, checked once above, does not change)."""
    accepted = []
    for offset in range(len(REPORT)):
        damaged = bytearray(REPORT)
        damaged[offset] ^= 1 << bit
        try:
            signed_by(CHAIN[0], parse_report(bytes(damaged)))
        except EvidenceError:
            continue
        accepted.append(offset)
    assert accepted == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_bit_change_in_the_certificate_chain_is_refused_cleanly(data: st.DataObject) -> None:
    ders = [c.public_bytes(serialization.Encoding.DER) for c in CHAIN]
    which = data.draw(st.integers(0, len(ders) - 1))
    damaged = bytearray(ders[which])
    damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        cert = x509.load_der_x509_certificate(bytes(damaged))
    except (ValueError, x509.InvalidVersion):
        return  # no longer a certificate: the chain's PEM loader refuses it (tests below)
    chain = [*CHAIN[:which], cert, *CHAIN[which + 1 :]]
    with pytest.raises(EvidenceError):
        VERIFIER.authenticate(REPORT, chain, AT)


def test_a_damaged_pem_chain_is_a_clean_refusal() -> None:
    with pytest.raises(EvidenceError, match="not a PEM certificate chain"):
        load_pem_chain(CHAIN_PEM.replace(b"MII", b"MIJ", 1), "GPU certificate chain")


def test_a_certificate_with_a_damaged_version_is_a_clean_refusal() -> None:
    """cryptography raises x509.InvalidVersion, which is no ValueError, for a version field out of range
    (found by the bit-flip property test above): a host's evidence must never turn it into a traceback."""
    ders = [c.public_bytes(serialization.Encoding.DER) for c in CHAIN]
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2: X.509 v3
    assert v3 in ders[0]
    ders[0] = ders[0].replace(v3, b"\xa0\x03\x02\x01\x05", 1)
    pem = b"".join(
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n" for der in ders
    )
    with pytest.raises(EvidenceError, match="not a PEM certificate chain"):
        load_pem_chain(pem, "GPU certificate chain")


def test_the_chain_must_end_at_the_pinned_root() -> None:
    with pytest.raises(EvidenceError, match="does not end at the pinned root"):
        VERIFIER.authenticate(REPORT, CHAIN[:-1], AT)
    other = NvidiaGpuVerifier(device_root=(DATA / "verifier_RIM_root.pem").read_bytes())
    with pytest.raises(EvidenceError, match="does not end at the pinned root"):
        other.authenticate(REPORT, CHAIN, AT)


def test_the_chain_is_checked_at_the_verification_time() -> None:
    with pytest.raises(EvidenceError, match="valid only from 2020-10-17"):
        VERIFIER.authenticate(REPORT, CHAIN, 1577836800)  # 2020-01-01, before the leaf's notBefore


def test_a_leaf_of_another_gpu_is_refused_by_fwid_and_signature() -> None:
    gpu = GpuUnderTestRoots.make()
    chain = [gpu.chain[0], *CHAIN[1:]]
    with pytest.raises(EvidenceError):
        VERIFIER.authenticate(REPORT, chain, AT)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda r: r[:-1], "signature is 95 bytes"),
        (lambda r: r + b"\0", "signature is 97 bytes"),
        (lambda r: r[:36], "request is 36 bytes"),
        (lambda r: r[:37], "response is truncated"),
        (lambda r: r[:37 + 8 + 100], "measurement record runs past the response"),
        (lambda r: r[:2] + b"\x00" + r[3:], "no signature asked for"),
        (lambda r: r[:3] + b"\x01" + r[4:], "asks for measurement 1"),
        (lambda r: r[:37] + b"\x12" + r[38:], "SPDM version 0x12"),
        (lambda r: r[:41] + b"\x3f" + r[42:], "announces 63 measurement blocks but holds 64"),
        (lambda r: r[:45] + b"\x02" + r[46:], "block index 2 is repeated"),
        (lambda r: r[:46] + b"\x02" + r[47:], "not DMTF-formed"),
        (lambda r: r + bytes(8193), "more than NVML's 8192"),
    ],
)
def test_malformed_reports_are_refused_with_a_named_reason(cut, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EvidenceError, match=message):
        parse_report(cut(REPORT))


def test_a_repeated_opaque_field_is_refused() -> None:
    gpu = GpuUnderTestRoots.make()
    gpu.driver_version = "1"
    raw = gpu.report(NONCE)
    opaque = gpu.opaque()
    start = raw.index(opaque)
    doubled = opaque + opaque[: 4 + 2]  # driver version field again, "1\0"
    patched = raw[: start - 2] + len(doubled).to_bytes(2, "little") + doubled + raw[start + len(opaque) :]
    with pytest.raises(EvidenceError, match="driver_version appears twice"):
        parse_report(patched)


def test_evidence_document_shape_attacks_are_refused_cleanly() -> None:
    ctx = VerificationContext(None, NONCE, b"", AT)
    gpu = {"report": b64e(REPORT), "cert_chain": CHAIN_PEM.decode()}
    for evidence, message in [
        ({"kind": "nvidia-gpu"}, "no 'gpus' list"),
        ({"kind": "nvidia-gpu", "gpus": []}, "no 'gpus' list"),
        ({"kind": "nvidia-gpu", "gpus": {"0": gpu}}, "no 'gpus' list"),
        ({"kind": "nvidia-gpu", "gpus": [gpu] * 17}, "more than 16"),
        ({"kind": "nvidia-gpu", "gpus": ["x"]}, "must be an object"),
        ({"kind": "nvidia-gpu", "gpus": [{"report": b64e(REPORT)}]}, "no 'cert_chain'"),
        ({"kind": "nvidia-gpu", "gpus": [{"report": 7, "cert_chain": CHAIN_PEM.decode()}]}, "report"),
        ({"kind": "nvidia-gpu", "gpus": [gpu], "rims": "x"}, "'rims' must be a list"),
        ({"kind": "nvidia-gpu", "gpus": [gpu], "rims": ["x"] * 9}, "'rims' must be a list"),
    ]:
        with pytest.raises(EvidenceError, match=message):
            VERIFIER.verify(json.loads(json.dumps(evidence)), ctx)


def test_nvml_structures_are_read_within_their_buffers() -> None:
    pynvml = pytest.importorskip("pynvml")
    report_struct = pynvml.c_nvmlConfComputeGpuAttestationReport_t()
    ctypes.memmove(report_struct.attestationReport, REPORT, len(REPORT))
    report_struct.attestationReportSize = len(REPORT)
    cert_struct = pynvml.c_nvmlConfComputeGpuCertificate_t()
    ctypes.memmove(cert_struct.attestationCertChain, CHAIN_PEM, len(CHAIN_PEM))
    cert_struct.attestationCertChainSize = len(CHAIN_PEM)
    gpu = evidence_from_nvml(report_struct, cert_struct)
    chain = load_pem_chain(gpu["cert_chain"].encode(), "GPU certificate chain")
    assert VERIFIER.authenticate(b64d(gpu["report"]), chain, AT).request_nonce == NONCE
    report_struct.attestationReportSize = len(report_struct.attestationReport) + 1
    with pytest.raises(EvidenceError, match="attestation report of"):
        evidence_from_nvml(report_struct, cert_struct)
    report_struct.attestationReportSize = len(REPORT)
    cert_struct.attestationCertChainSize = 0
    with pytest.raises(EvidenceError, match="certificate chain of 0 bytes"):
        evidence_from_nvml(report_struct, cert_struct)


def test_a_test_gpu_report_is_authentic_under_its_own_root_only() -> None:
    gpu = GpuUnderTestRoots.make()
    nonce = bytes(range(32))
    ours = NvidiaGpuVerifier(device_root=pem(gpu.root).encode())
    assert ours.authenticate(gpu.report(nonce), gpu.chain, AT).request_nonce == nonce
    with pytest.raises(EvidenceError, match="does not end at the pinned root"):
        VERIFIER.authenticate(gpu.report(nonce), gpu.chain, AT)
    with pytest.raises(EvidenceError, match="signature does not verify"):
        ours.authenticate(gpu.report(nonce, sign=False), gpu.chain, AT)


def test_requirements_on_several_gpus_are_met_by_each() -> None:
    parts = [
        Claims("nvidia-gpu", measurements={"driver_version": v, "rim_match": "true"}) for v in ("570.1", "570.2")
    ]
    whole = Claims("nvidia-gpu", measurements={"rim_match": "true", "gpu_count": "2"}, parts=parts)
    assert unmet({"kind": "nvidia-gpu", "measurements": {"driver_version": ["570.1", "570.2"]}}, whole) is None
    assert unmet({"kind": "nvidia-gpu", "measurements": {"driver_version": "570.1"}}, whole) == (
        "device 1: nvidia-gpu measurement driver_version = 570.2 is not one the grant allows"
    )
    assert unmet({"kind": "nvidia-gpu", "measurements": {"gpu_count": "8"}}, whole) == (
        "nvidia-gpu measurement gpu_count = 2 is not one the grant allows"
    )


# --- GPUs and RIMs made under the test's own roots: matching, mismatching, several, bound or not -----------


@pytest.fixture(scope="module")
def made() -> tuple[GpuUnderTestRoots, RimSignerUnderTestRoots, NvidiaGpuVerifier]:
    gpu, signer = GpuUnderTestRoots.make(), RimSignerUnderTestRoots.make()
    verifier = NvidiaGpuVerifier(
        device_root=pem(gpu.root).encode(), rim_root=pem(signer.root).encode(), rims=signer.rims_for(gpu)
    )
    return gpu, signer, verifier


def test_a_made_gpu_matching_its_rims_verifies_and_one_changed_measurement_is_named(made) -> None:  # type: ignore[no-untyped-def]
    gpu, _, verifier = made
    binding = bytes(range(32))
    ctx = VerificationContext(None, binding, b"", AT)
    claims = verifier.verify(gpu.evidence(binding), ctx)
    assert claims.report_data_bound and claims.measurements["vbios_version"] == "96.00.9F.00.01"
    saved = dict(gpu.measurements)
    try:
        gpu.measurements[24] = bytes(48)  # block 24 = RIM index 23, in the driver RIM
        with pytest.raises(EvidenceError, match=r"^GPU measurement\(s\) 23 \(driver\) differ"):
            verifier.verify(gpu.evidence(binding), ctx)
        gpu.measurements[36] = bytes(48)  # RIM index 35: not compared when NVDEC0 is disabled, as nvtrust does
        gpu.nvdec0 = b"\x55"
        with pytest.raises(EvidenceError, match=r"^GPU measurement\(s\) 23 \(driver\) differ"):
            verifier.verify(gpu.evidence(binding), ctx)
        gpu.measurements[24] = saved[24]
        assert verifier.verify(gpu.evidence(binding), ctx).report_data_bound
        gpu.nvdec0 = b"\xaa"
        with pytest.raises(EvidenceError, match=r"^GPU measurement\(s\) 35 \(driver\) differ"):
            verifier.verify(gpu.evidence(binding), ctx)
    finally:  # the fixture is shared by the module's tests
        gpu.measurements, gpu.nvdec0 = saved, b"\xaa"


def test_several_gpus_each_bound_to_the_challenge_and_each_counted_once(made) -> None:  # type: ignore[no-untyped-def]
    gpu, _, verifier = made
    binding, other = bytes(range(32)), bytes(32)
    twin = gpu.sibling()
    one, two = gpu.evidence(binding)["gpus"][0], twin.evidence(binding)["gpus"][0]  # type: ignore[index]
    stale = twin.evidence(other)["gpus"][0]  # type: ignore[index]
    ctx = VerificationContext(None, binding, b"", AT)
    claims = verifier.verify({"kind": "nvidia-gpu", "gpus": [one, two]}, ctx)
    assert claims.report_data_bound and claims.measurements["gpu_count"] == "2" and len(claims.parts) == 2
    mixed = verifier.verify({"kind": "nvidia-gpu", "gpus": [one, stale]}, ctx)
    assert not mixed.report_data_bound
    assert mixed.details["binding_mismatch"].startswith("GPU 1's nonce 0000")
    again = gpu.evidence(binding)["gpus"][0]  # type: ignore[index]
    for repeated in ([one, one], [one, two, again]):  # the same report twice, or a second report of one GPU
        with pytest.raises(EvidenceError, match=r"is GPU 0 again \(same attestation key\): each GPU counts once"):
            verifier.verify({"kind": "nvidia-gpu", "gpus": repeated}, ctx)


def test_rims_of_one_version_with_different_golden_values_are_ambiguous_not_ordered() -> None:
    """NVIDIA's PROD and test VBIOS RIMs for 96.00.5E.00.01: configured together, neither is chosen by its
    place in the list; the owner keeps the one they accept."""
    for order in ((RIMS["driver"], RIMS["prod"], RIMS["vbios"]), (RIMS["driver"], RIMS["vbios"], RIMS["prod"])):
        with pytest.raises(EvidenceError, match=r"2 VBIOS RIMs for GH100 96\.00\.5E\.00\.01 with different golden"):
            NvidiaGpuVerifier(rims=order).verify(SAMPLE_2023, VerificationContext(None, NONCE_2023, b"", RIM_AT))


def test_a_rim_that_no_longer_verifies_does_not_hide_one_that_does(made) -> None:  # type: ignore[no-untyped-def]
    gpu, signer, _ = made
    expired = RimSignerUnderTestRoots.make()
    expired.root = signer.root  # a different signer chain: it will not lead to the root, so it fails
    stale_driver, _ = expired.rims_for(gpu)
    driver, vbios = signer.rims_for(gpu)
    verifier = NvidiaGpuVerifier(
        device_root=pem(gpu.root).encode(), rim_root=pem(signer.root).encode(), rims=(stale_driver, driver, vbios)
    )
    binding = bytes(range(32))
    assert verifier.verify(gpu.evidence(binding), VerificationContext(None, binding, b"", AT)).report_data_bound


def test_an_unknown_version_costs_no_signature_check() -> None:
    many = NvidiaGpuVerifier(rims=(RIMS["driver"], RIMS["vbios"]) * 50)
    evidence = {"kind": "nvidia-gpu", "gpus": [{"report": b64e(REPORT), "cert_chain": CHAIN_PEM.decode()}]}
    with pytest.raises(EvidenceError, match=r"no driver RIM for GH100 version 550\.90\.07 is configured"):
        many.verify(evidence, VerificationContext(None, NONCE, b"", RIM_AT))
    assert many._verified == {}  # nothing was verified: no RIM names 550.90.07


@pytest.mark.slow
def test_cli_verifies_the_gpu_sample_with_rims_and_names_a_mismatch(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "modelseal", "attest", "verify", str(DATA / "hopperAttestationReport-2023.txt"),
            "--kind", "nvidia-gpu", "--cert-chain", str(DATA / "hopperCertChain-2023.txt"),
            "--at", str(RIM_AT), "--rim", str(DATA / "Driver_RIM_test_no_gpu.swidtag")]  # fmt: skip
    ok = subprocess.run(
        [*base, "--rim", str(DATA / "1010_0200_882_96005E0001_test_no_gpu.swidtag"), "--binding", NONCE_2023.hex(),
         "--require", '{"measurements": {"driver_version": "545.00"}}', "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["measurements"]["vbios_version"] == "96.00.5E.00.01"
    prod = subprocess.run(
        [*base, "--rim", str(DATA / "1010_0200_882_96005E0001_PROD.swidtag")], capture_output=True, text=True
    )
    assert prod.returncode == 1 and "Traceback" not in prod.stderr
    assert "GPU measurement(s) 1 (VBIOS), 2 (VBIOS), 3 (VBIOS), 9 (VBIOS) differ" in prod.stderr
