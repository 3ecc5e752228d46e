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
