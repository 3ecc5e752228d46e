"""The ``sgx`` kind: an Intel SGX quote, verified by :class:`modelseal.attest.dcap.DcapVerifier`, collected
inside a Gramine enclave through ``/dev/attestation`` with its collateral from a PCCS.

Key service, ``[attestation]``: ``dcap_root_ca`` (shared with ``tdx``). Agent, ``[sgx]``: ``path`` (default
``/dev/attestation``) and ``pccs_url`` (required).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelseal.attest.base import REPORT_DATA_SIZE, EvidenceError, expected_report_data
from modelseal.attest.dcap import kind_of, pccs_collateral
from modelseal.encoding import b64e
from modelseal.errors import UsageError


class GramineCollector:
    """An SGX quote from Gramine's ``/dev/attestation`` (the enclave's own report data)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
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


KIND = kind_of("sgx", GramineCollector, agent_table="sgx")
