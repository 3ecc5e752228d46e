"""``modelseal attest ...``: verify attestation evidence offline, the way the key service does."""

from __future__ import annotations

import binascii
import json
import time
from pathlib import Path
from typing import Any

import click

from modelseal.cli.helptext import Group
from modelseal.cli.kit import emit, fail_closed, json_option
from modelseal.encoding import b64e
from modelseal.errors import UsageError
from modelseal.jsonlimits import JSONLimitError, loads_bounded

RAW_KINDS = ("sgx", "tdx", "sev-snp", "nvidia-gpu")


def read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def unhex(data: bytes) -> bytes:
    """Reports are often shared as hex text (NVIDIA's and AMD's samples are)."""
    try:
        return binascii.unhexlify(b"".join(data.split()))
    except (binascii.Error, ValueError):
        return data


def evidence_document(path: str, kind: str | None, extras: dict[str, str | None]) -> dict[str, Any]:
    """An evidence JSON document as the agent sends it, or one built from a raw quote/report and its files."""
    data = read(path, "evidence")
    if data.lstrip().startswith(b"{"):
        try:
            doc = loads_bounded(data, max_bytes=16 * 1024 * 1024, max_depth=32, what=path)
        except JSONLimitError as exc:
            raise UsageError(str(exc)) from None
        if not isinstance(doc, dict):
            raise UsageError(f"{path} is not an evidence document (a JSON object)")
        if kind and doc.get("kind") != kind:
            raise UsageError(f"{path} holds {doc.get('kind')} evidence, not {kind}")
        return dict(doc)
    if kind not in RAW_KINDS:
        raise UsageError(f"a raw quote or report needs --kind ({', '.join(RAW_KINDS)}); TPM evidence must be JSON")
    if kind == "nvidia-gpu":
        if not extras["cert_chain"]:
            raise UsageError("a raw NVIDIA GPU report needs --cert-chain (the GPU's PEM chain, leaf first)")
        chain = read(extras["cert_chain"], "certificate chain").decode(errors="replace")
        return {"kind": kind, "gpus": [{"report": b64e(unhex(data)), "cert_chain": chain}]}
    if kind == "sev-snp":
        if not (extras["vcek"] and extras["cert_chain"]):
            raise UsageError("a raw SEV-SNP report needs --vcek and --cert-chain")
        return {
            "kind": kind,
            "report": b64e(unhex(data)),
            "vcek": b64e(read(extras["vcek"], "VCEK certificate")),
            "cert_chain": read(extras["cert_chain"], "certificate chain").decode(errors="replace"),
        }
    if not extras["collateral"]:
        raise UsageError(f"a raw {kind.upper()} quote needs --collateral (JSON from a PCCS)")
    try:
        collateral = json.loads(read(extras["collateral"], "collateral"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{extras['collateral']} is not valid JSON: {exc}") from None
    return {"kind": kind, "quote": b64e(data), "collateral": collateral}


@click.group(cls=Group)
def attest() -> None:
    """Attestation evidence: TPM 2.0 quotes, Intel SGX/TDX DCAP quotes, AMD SEV-SNP and NVIDIA GPU reports."""


@attest.command("verify")
@click.argument("evidence", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(["tpm", *RAW_KINDS]), help="Evidence kind (JSON says it).")
@click.option("--collateral", type=click.Path(dir_okay=False), help="SGX/TDX: collateral JSON for a raw quote.")
@click.option("--vcek", type=click.Path(dir_okay=False), help="SEV-SNP: the chip's VCEK certificate (DER or PEM).")
@click.option(
    "--cert-chain", type=click.Path(dir_okay=False), help="SEV-SNP: AMD's ASK + ARK (PEM); nvidia-gpu: the GPU's chain."
)
@click.option(
    "--rim", "rims", multiple=True, type=click.Path(dir_okay=False), help="nvidia-gpu: a driver or VBIOS RIM (repeat)."
)
@click.option(
    "--at", "at", type=click.IntRange(0, 253402300799), help="Verify at this Unix time instead of now (audits)."
)
@click.option("--binding", help="Hex of the 32-byte binding the report data or TPM nonce must carry.")
@click.option("--require", "requirement", help='A grant requirement to check, JSON: {"measurements": {...}, ...}.')
@json_option
@fail_closed
def attest_verify(
    evidence: str,
    kind: str | None,
    collateral: str | None,
    vcek: str | None,
    cert_chain: str | None,
    rims: tuple[str, ...],
    at: int | None,
    binding: str | None,
    requirement: str | None,
    as_json: bool,
) -> None:
    """Verify EVIDENCE (the agent's JSON, or a raw quote/report) and print the proven claims.

    Exits 1, naming what failed, when the evidence is not genuine, not bound to --binding, or does not
    meet --require.
    """
    from modelseal.attest import EvidenceError, VerificationContext, get_verifier, verifiers_from_config
    from modelseal.attest.base import unmet

    doc = evidence_document(evidence, kind, {"collateral": collateral, "vcek": vcek, "cert_chain": cert_chain})
    if rims and doc.get("kind") != "nvidia-gpu":
        raise UsageError("--rim applies to nvidia-gpu evidence only")
    if rims:  # trusted as the key service's nvidia_rims setting is
        verifier = verifiers_from_config({"nvidia_rims": list(rims)}).get("nvidia-gpu")
    else:
        verifier = get_verifier(str(doc.get("kind")))
    if verifier is None or doc.get("kind") == "mtls":
        raise UsageError(f"cannot verify {doc.get('kind')!r} evidence offline")
    try:
        expected = bytes.fromhex(binding) if binding else None
    except ValueError:
        raise UsageError("--binding must be hex") from None
    if expected is not None and len(expected) != 32:
        raise UsageError("--binding must be 32 bytes (64 hex digits)")
    claims = verifier.verify(doc, VerificationContext(None, expected, b"", at if at is not None else int(time.time())))
    result = claims.to_json()
    problems = []
    if expected is not None and not claims.report_data_bound:
        problems.append(str(claims.details.get("binding_mismatch", "the evidence is not bound to --binding")))
    if requirement:
        try:
            wanted = json.loads(requirement)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--require is not valid JSON: {exc}") from None
        if not isinstance(wanted, dict):
            raise UsageError('--require must be a JSON object, like {"measurements": {...}}')
        req = verifier.check_requirement({**wanted, "kind": claims.kind})
        problems += [p for p in [unmet(req, claims)] if p]
    result["verified"] = not problems
    if problems:
        result["problems"] = problems
    emit(as_json, result, lambda: click.echo(json.dumps(result, indent=2)))
    if problems:
        raise EvidenceError("; ".join(problems))


@attest.command("kinds")
@json_option
@fail_closed
def attest_kinds(as_json: bool) -> None:
    """List the evidence kinds this installation can verify."""
    from modelseal.attest import known_kinds

    emit(as_json, known_kinds(), known_kinds())
