"""The ``tdx`` kind: an Intel TDX quote, verified by :class:`modelseal.attest.dcap.DcapVerifier`, collected
in the confidential VM through configfs-tsm with its collateral from a PCCS.

Key service, ``[attestation]``: ``dcap_root_ca`` (shared with ``sgx``). Agent, ``[tsm]``: ``path`` (default
``/sys/kernel/config/tsm/report``) and ``pccs_url`` (required).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelseal.attest.dcap import kind_of, pccs_collateral
from modelseal.attest.tsm import TSM_REPORTS, tsm_report
from modelseal.encoding import b64e
from modelseal.errors import UsageError


class TdxCollector:
    """A TDX quote from configfs-tsm with the binding as report data, and its collateral."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.root = Path(settings.get("path", TSM_REPORTS))
        self.pccs_url = str(settings.get("pccs_url") or "")
        if not self.pccs_url:
            raise UsageError('evidence "tdx" needs [tsm] pccs_url to fetch the quote\'s collateral')

    def __call__(self, binding: bytes, nonce: bytes) -> dict[str, Any]:
        quote, _ = tsm_report(self.root, "tdx_guest", binding)
        return {"kind": "tdx", "quote": b64e(quote), "collateral": pccs_collateral(self.pccs_url, quote)}


KIND = kind_of("tdx", TdxCollector, agent_table="tsm")
