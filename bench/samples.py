"""The public attestation samples in tests/data/attestation (SGX and TDX DCAP quotes with collateral, an
AMD SEV-SNP Milan report with its certificates) as evidence documents, at times inside their collateral
windows. Used by bench/attest.py and tests/test_attest_samples.py (as ``bench.samples``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelseal.encoding import b64e

# Public samples (Phala-Network/dcap-qvl, MIT; virtee/sev, Apache-2.0), copied with their licences.
SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "attestation"
# Inside each collateral's window (latest issueDate .. earliest nextUpdate), per the samples' README.
AT = {"sgx_quote": 1752919277, "tdx_quote": 1752919234, "tdx_quote_outdated": 1772323200}
SNP_AT = 1752919277


def dcap_evidence(name: str) -> dict[str, Any]:
    kind = name.split("_")[0]
    quote = (SAMPLES / "dcap" / name).read_bytes()
    collateral = json.loads((SAMPLES / "dcap" / f"{name}_collateral.json").read_text())
    return {"kind": kind, "quote": b64e(quote), "collateral": collateral}


def snp_evidence() -> dict[str, Any]:
    return {
        "kind": "sev-snp",
        "report": b64e(bytes.fromhex((SAMPLES / "snp" / "report_milan.hex").read_text().strip())),
        "vcek": b64e((SAMPLES / "snp" / "vcek_milan.der").read_bytes()),
        "cert_chain": (SAMPLES / "snp" / "cert_chain_milan").read_text(),
    }


# NVIDIA's 2023 Hopper sample (nvtrust, Apache-2.0): the report the sample driver and VBIOS RIMs describe.
NVIDIA = SAMPLES / "nvidia"
NVIDIA_AT = 1717200000  # 2024-06-01: inside the RIM signing certificates' validity (2023-06-27 .. 2025-06-22)
NVIDIA_NONCE = bytes.fromhex("4cff7f5380ead8fad8ec2c531c110aca4302a88f603792801a8ca29ee151af2e")
NVIDIA_RIMS = [
    str(NVIDIA / "Driver_RIM_test_no_gpu.swidtag"),
    str(NVIDIA / "1010_0200_882_96005E0001_test_no_gpu.swidtag"),
]


def nvidia_evidence() -> dict[str, Any]:
    gpu = {
        "report": b64e(bytes.fromhex((NVIDIA / "hopperAttestationReport-2023.txt").read_text().strip())),
        "cert_chain": (NVIDIA / "hopperCertChain-2023.txt").read_text(),
    }
    return {"kind": "nvidia-gpu", "gpus": [gpu]}
