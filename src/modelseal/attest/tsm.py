"""configfs-tsm: a TEE report from a confidential VM's kernel (``/sys/kernel/config/tsm/report``, Linux
6.7+), the driver the ``tdx`` and ``sev-snp`` collectors share, as :mod:`modelseal.attest.tpm_tools` is the
``tpm`` collector's. Only public data passes through it; the report data carries the exchange's binding.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from modelseal.attest.base import EvidenceError, expected_report_data

TSM_REPORTS = "/sys/kernel/config/tsm/report"


def tsm_report(root: Path, provider: str, binding: bytes) -> tuple[bytes, bytes]:
    """``(outblob, auxblob)`` of one report request with ``binding`` as report data, from the TEE whose
    configfs-tsm provider is ``provider`` (``tdx_guest``, ``sev_guest``); auxblob is empty when absent."""
    if not root.is_dir():
        raise EvidenceError(
            f"{root} does not exist: this is not a confidential VM with configfs-tsm "
            "(Linux 6.7+, `mount -t configfs none /sys/kernel/config`)"
        )
    entry = root / f"modelseal-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        entry.mkdir()
        found = (entry / "provider").read_text().strip()
        if found != provider:
            raise EvidenceError(f"configfs-tsm provider is {found}, not {provider}")
        (entry / "inblob").write_bytes(expected_report_data(binding))
        generation = (entry / "generation").read_text()
        out = (entry / "outblob").read_bytes()
        aux = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
        if (entry / "generation").read_text() != generation:
            raise EvidenceError("another process changed the configfs-tsm request mid-way; try again")
        return out, aux
    except OSError as exc:
        raise EvidenceError(f"configfs-tsm at {root}: {exc.strerror or exc}") from None
    finally:
        try:
            entry.rmdir()
        except OSError:
            pass
