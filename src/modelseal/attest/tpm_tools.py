"""The host's TPM 2.0, through ``tpm2-tools``: enrol an attestation key (AK) and quote PCRs with a nonce.

The TCTI picks the TPM: ``device:/dev/tpmrm0`` (the kernel resource manager) on a real host, or
``swtpm:host=127.0.0.1,port=2321`` for a software TPM. swtpm has no resource manager, so every step that
loads a transient object flushes it again (the TPM has only three slots).

The ``tpm`` kind's collector (:class:`modelseal.attest.tpm.TpmCollector`) quotes through this driver.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from modelseal.attest import tpm_structs
from modelseal.attest.base import EvidenceError

DEFAULT_HANDLE = "0x81010002"
DEFAULT_PCRS = "sha256:0,1,2,3,4,5,6,7"


def run_tool(args: list[str], env: dict[str, str], what: str) -> None:
    """Run one tpm2-tools command; its last stderr line becomes the error."""
    try:
        subprocess.run(args, env=env, check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise EvidenceError(f"{args[0]} is not installed (Debian: apt install tpm2-tools)") from None
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise EvidenceError(f"{what} failed: {detail[0]}") from None
    except subprocess.TimeoutExpired:
        raise EvidenceError(f"{what} timed out after 30 s") from None


def tcti_env(tcti: str) -> dict[str, str]:
    return {**os.environ, "TPM2TOOLS_TCTI": tcti}


def read_ak_public(tcti: str, handle: str) -> bytes:
    """The TPM2B_PUBLIC of the attestation key persisted at ``handle``."""
    with tempfile.TemporaryDirectory(prefix="modelseal-tpm-") as tmp:
        path = Path(tmp) / "ak.pub"
        run_tool(
            ["tpm2_readpublic", "-c", handle, "-f", "tss", "-o", str(path)],
            tcti_env(tcti),
            f"reading the attestation key at {handle} (run `modelseal agent tpm-enroll` first)",
        )
        return path.read_bytes()


def quote(tcti: str, handle: str, pcrs: str, nonce: bytes) -> tuple[bytes, bytes, dict[str, dict[str, str]]]:
    """A quote by the AK at ``handle`` over ``pcrs`` with ``nonce`` as extraData: the TPMS_ATTEST, the
    TPMT_SIGNATURE, and the quoted PCR values (``{bank: {index: hex}}``)."""
    with tempfile.TemporaryDirectory(prefix="modelseal-tpm-") as tmp:
        work = Path(tmp)
        run_tool(
            ["tpm2_quote", "-c", handle, "-l", pcrs, "-q", nonce.hex(), "-g", "sha256",
             "-m", str(work / "quote"), "-s", str(work / "sig"), "-o", str(work / "pcrs"), "-F", "values"],
            tcti_env(tcti),
            "the TPM quote",
        )  # fmt: skip
        attest, signature, values = ((work / n).read_bytes() for n in ("quote", "sig", "pcrs"))
    selection = tpm_structs.parse_quote(attest).selection
    banks: dict[str, dict[str, str]] = {}
    offset = 0
    for bank, indices in selection:
        size = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}[bank]
        for index in indices:
            banks.setdefault(bank, {})[str(index)] = values[offset : offset + size].hex()
            offset += size
    return attest, signature, banks


def enroll(tcti: str, handle: str = DEFAULT_HANDLE, pcrs: str = DEFAULT_PCRS, replace: bool = False) -> dict[str, Any]:
    """Create an ECC endorsement key and a restricted ECDSA P-256 attestation key under it, persist the AK at
    ``handle`` (an existing AK there is kept unless ``replace``), quote the PCRs once, and return what the
    owner pins in a grant: the AK's TPM name and the current PCR values, as a ready requirement."""
    env = tcti_env(tcti)
    exists = subprocess.run(["tpm2_readpublic", "-c", handle], env=env, capture_output=True).returncode == 0
    if exists and replace:
        run_tool(["tpm2_evictcontrol", "-C", "o", "-c", handle], env, f"removing the old key at {handle}")
    if replace or not exists:
        with tempfile.TemporaryDirectory(prefix="modelseal-tpm-") as tmp:
            ek, ak = str(Path(tmp) / "ek.ctx"), str(Path(tmp) / "ak.ctx")
            steps = [
                (["tpm2_createek", "-c", ek, "-G", "ecc", "-u", str(Path(tmp) / "ek.pub")], "creating the EK"),
                (["tpm2_flushcontext", "-t"], "flushing transient objects"),
                (["tpm2_createak", "-C", ek, "-c", ak, "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
                  "-u", str(Path(tmp) / "ak.pub"), "-n", str(Path(tmp) / "ak.name")], "creating the AK"),
                (["tpm2_flushcontext", "-t"], "flushing transient objects"),
                (["tpm2_flushcontext", "-s"], "flushing sessions"),
                (["tpm2_evictcontrol", "-C", "o", "-c", ak, handle], f"persisting the AK at {handle}"),
                (["tpm2_flushcontext", "-t"], "flushing transient objects"),
            ]  # fmt: skip
            for args, what in steps:
                run_tool(args, env, what)
    name = tpm_structs.parse_public(read_ak_public(tcti, handle)).name
    _, _, banks = quote(tcti, handle, pcrs, os.urandom(32))
    measurements = {"ak": name}
    for bank, values in banks.items():
        measurements.update({f"pcr.{bank}.{index}": value for index, value in values.items()})
    return {"handle": handle, "created": replace or not exists, "ak_name": name,
            "requirement": {"kind": "tpm", "measurements": measurements}}  # fmt: skip
