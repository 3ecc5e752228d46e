"""``modelseal trace`` (which licence a leaked copy was sealed for) and ``modelseal fingerprint keygen``.

Thin: the scheme is ``sealing/fingerprint.py``, the statistics ``sealing/trace.py``. Exit codes: 0 when a
licensee is identified, 3 when none passes the threshold (a normal answer, not an error), 1 on errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from modelseal import atomicfile
from modelseal.cli.helptext import ADMIN_VARS, IDENTITY_VARS, Command, Group
from modelseal.cli.kit import emit, fail_closed, json_option, out, require_inputs
from modelseal.cli.progress import byte_progress
from modelseal.errors import UsageError

URL_ENV = "MODELSEAL_KEYSERVER_URL"
NOT_IDENTIFIED = 3  # exit status when no candidate passes the threshold
MAX_CANDIDATES = 1_000_000


def candidate_list(spec: str) -> list[str]:
    """``--candidates``: comma-separated ids, ``@FILE`` with one id per line (``#`` comments skipped), or
    ``keyserver`` / ``keyserver:MODEL``: the licence ids (``grant add --licence``) of the key service's
    grants (of that model), read with the admin API.
    """
    if spec == "keyserver" or spec.startswith("keyserver:"):
        ids = keyserver_licences(spec.partition(":")[2] or None)
    elif spec.startswith("@"):
        path = spec[1:]
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the candidate list {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"the candidate list {path} is not text") from None
        ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids:
        raise UsageError("--candidates names no licence id")
    if len(ids) > MAX_CANDIDATES:
        raise UsageError(f"--candidates names {len(ids)} licences, more than {MAX_CANDIDATES}")
    return ids


def keyserver_licences(model: str | None) -> list[str]:
    """The distinct licence ids the key service's grants (of ``model``) carry, revoked grants included: a
    copy may have leaked before its licence was revoked."""
    from modelseal.release.client import AdminClient

    url = os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"--candidates keyserver needs the key service's URL in {URL_ENV} (and its admin token)")
    with AdminClient(url, ca=os.environ.get("MODELSEAL_KEYSERVER_CA")) as admin:
        grants = admin.grants(model)
    ids = sorted({str(g["terms"]["licence"]) for g in grants if (g.get("terms") or {}).get("licence")})
    if not ids:
        which = f" of model {model}" if model else ""
        raise UsageError(f"the key service's grants{which} carry no licence id (`keyserver grant add --licence ID`)")
    return ids


@click.command(
    cls=Command,
    reads=[*IDENTITY_VARS, *ADMIN_VARS, "MODELSEAL_THREADS",
           ("VAR", "The variable -i env:VAR or --fingerprint-key env:VAR names.")],
)  # fmt: skip
@click.argument("suspect", type=click.Path())
@click.option(
    "--original",
    required=True,
    type=click.Path(),
    help="The unfingerprinted model (same formats as SUSPECT) the copies were made from.",
)
@click.option(
    "--fingerprint-key",
    "key_spec",
    required=True,
    metavar="FILE|env:VAR",
    help="The owner's fingerprint key used at seal time: a key file, or env:VAR holding its text.",
)
@click.option(
    "--candidates",
    required=True,
    metavar="IDS|@FILE|keyserver[:MODEL]",
    help="Licence ids to test: comma-separated, @FILE with one id per line, or keyserver[:MODEL] for the "
    "licence ids of the key service's grants (of MODEL), read with the admin API.",
)
@click.option(
    "-i",
    "--identity",
    "identities",
    multiple=True,
    metavar="IDENTITY",
    help="Identity to open a sealed SUSPECT (or ORIGINAL) with (repeatable); as for `modelseal open`.",
)
@click.option(
    "--alpha",
    type=float,
    default=1e-6,
    show_default=True,
    help="The false-accusation probability the threshold guarantees over all candidates.",
)
@json_option
@fail_closed
def trace(
    suspect: str,
    original: str,
    key_spec: str,
    candidates: str,
    identities: tuple[str, ...],
    alpha: float,
    as_json: bool,
) -> None:
    """Name the licence a leaked copy was fingerprinted for, with its score, or nobody (exit 3).

    SUSPECT is a safetensors file, a .pt/.pth/.bin state dict, a directory of them, or a sealed copy
    (with -i). The score is a z-score; the threshold keeps the chance of naming an innocent licensee
    below --alpha over all candidates (docs/fingerprinting.md). Exit 0: identified; 3: no licensee
    identified; 1: an error.
    """
    from modelseal.load.artifacts import resolve_identity
    from modelseal.sealing import trace as tracing
    from modelseal.sealing.fingerprint import FingerprintKey

    require_inputs(suspect, original)
    if not 0 < alpha < 1:
        raise UsageError("--alpha must lie between 0 and 1")
    ids = candidate_list(candidates)
    key = FingerprintKey.load(key_spec)
    identity = resolve_identity(list(identities)) if identities else None
    with byte_progress("tracing", tracing.eligible_bytes(original), not as_json) as advance:
        result = tracing.trace(suspect, original, key, ids, identity=identity, alpha=alpha, progress=advance)
    report: dict[str, Any] = {
        "verdict": result.verdict,
        "licence": result.licence,  # null unless identified
        "best": result.top[0].licence,  # the best-scoring candidate, identified or not
        "score": round(result.score, 3),
        # 1 - the bound on naming an innocent candidate with this score (0 when the bound says nothing)
        "confidence": 1 - 10**result.log10_false_accusation_bound,
        "threshold": round(result.threshold, 3),
        "alpha": result.alpha,
        "log10_false_accusation_bound": round(result.log10_false_accusation_bound, 1),
        "implicated": result.implicated,
        "top": [{"licence": s.licence, "score": round(s.score, 3)} for s in result.top],
        "candidates": result.candidates,
        "positions": result.positions,
        "tensors": result.tensors,
        "missing_tensors": result.missing_tensors,
        "key_id": result.key_id,
    }

    def human() -> None:
        if result.identified:
            out.print(
                f"[bold]identified: {result.licence}[/] (score {result.score:.1f}, threshold {result.threshold:.2f}; "
                f"chance an innocent licensee scores this high < 1e{result.log10_false_accusation_bound:.0f})"
            )
            if len(result.implicated) > 1:
                out.print(f"also over the threshold (collusion?): {', '.join(result.implicated[1:])}")
        else:
            out.print(
                f"no licensee identified: best {result.top[0].licence} scores {result.score:.2f}, "
                f"under the threshold {result.threshold:.2f} for {result.candidates} candidates"
            )
        table = Table("licence", "score")
        for s in result.top:
            table.add_row(s.licence, f"{s.score:.2f}")
        out.print(table)
        missing = result.missing_tensors
        out.print(
            f"{result.positions} positions in {result.tensors} tensors"
            + (f"; {missing} fingerprinted tensors missing from (or reshaped in) the suspect" if missing else "")
        )

    emit(as_json, report, human)
    if not result.identified:
        sys.exit(NOT_IDENTIFIED)


@click.group(cls=Group)
def fingerprint_group() -> None:
    """The owner's fingerprint key (for `seal --fingerprint` and `trace`)."""


@fingerprint_group.command(
    writes=[("OUTPUT", "The fingerprint key file, mode 0600 (a secret: whoever holds it can find and strip marks).")]
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the key file (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@json_option
@fail_closed
def keygen(output: str, force: bool, as_json: bool) -> None:
    """Create a fingerprint key: 32 random bytes, base64, in a 0600 file."""
    from modelseal.sealing.fingerprint import FingerprintKey

    atomicfile.check_target(output, overwrite=force)
    key = FingerprintKey.generate()
    key.save(output, force)
    emit(as_json, {"file": output, "key_id": key.key_id}, [f"wrote fingerprint key {key.key_id} to {output}"])

