"""Tracing a leaked copy to the licence it was sealed for (the detector of :mod:`~modelseal.sealing.fingerprint`).

Given a suspect model, the original (unfingerprinted) one and the owner's fingerprint key, the residual
at the selected positions is ``r = clip((suspect - original) / step, ±CLIP)`` (in float32, whatever
dtype either copy is stored in). Positions the suspect zeroed (pruning) or made non-finite are left
out (``r = 0``). For a candidate licence with ±1 pattern ``s`` the score is

    z = <r, s> / ||r||

**Why this score.** Under the null hypothesis that the suspect owes nothing to licence ``c`` (another
licensee's copy, the original, a retrained model), ``c``'s signs are independent fair coins given ``r``,
so ``<r, s>`` is a Rademacher sum and Hoeffding's inequality bounds its tail exactly, whatever ``r``
is (heavy-tailed fine-tuning noise included, no Gaussian approximation needed):
``P(z >= t) <= exp(-t^2 / 2)``. Over ``C`` candidates (Bonferroni), naming someone innocent has
probability at most ``C * exp(-t^2 / 2)``, so the threshold ``t = sqrt(2 ln(C / alpha))`` keeps false
accusations below ``alpha`` (default 1e-6): 6.07 for 100 candidates, 6.44 for 1,000, 6.80 for 10,000.
For the licensee's own copy, ``r ≈ s`` and ``z ≈ sqrt(positions)``: hundreds for a real model. The
clip bounds what large unrelated changes (fine-tuning, added noise) can add to ``||r||``.

Scoring is a matrix-vector product per tensor and chunk of candidates (their sign bits against the
residual), never a loop per weight. :class:`Patterns` keeps a whole candidate set's ±1 patterns as int8
rows, for callers that trace many suspects against one model (bench/fingerprint.py).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelseal.crypto import keys
from modelseal.errors import NotSealedError, UsageError
from modelseal.format.directory import list_members
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.artifacts import open_artifact, open_locked, open_sealed_dir, resolve_identity
from modelseal.recipients.registry import IdentitySpec
from modelseal.sealing.align import align
from modelseal.sealing.fingerprint import (
    FLOAT_DTYPES,
    FingerprintKey,
    as_float32,
    check_licence,
    eligible,
    positions,
    sign_bits,
    steps,
    tensor_views,
)

ALPHA = 1e-6  # the false-accusation probability the default threshold guarantees, over all candidates
CLIP = 4.0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
_CHUNK = 256  # candidates per matrix-vector product

Progress = Callable[[int], None]


def threshold(candidates: int, alpha: float = ALPHA) -> float:
    """The score above which naming one of ``candidates`` licences is wrong with probability < ``alpha``."""
    if candidates < 1 or not 0 < alpha < 1:
        raise UsageError("need at least one candidate and 0 < alpha < 1")
    return math.sqrt(2 * math.log(candidates / alpha))


def log10_bound(z: float, candidates: int) -> float:
    """log10 of the bound on the chance that an innocent candidate scores ``z`` or more (capped at 0)."""
    return min(0.0, math.log10(candidates) - max(z, 0.0) ** 2 / (2 * math.log(10)))


# --- reading tensors from whatever the suspect is ---------------------------------------------------------


class Tensors:
    """Tensors by name from plain safetensors buffers, checkpoints converted in memory, or sealed files
    (decrypted one tensor at a time into buffers wiped by :meth:`done`)."""

    def __init__(self) -> None:
        self.info: dict[str, tuple[str, list[int]]] = {}
        self._plain: dict[str, np.ndarray] = {}
        self._sealed: dict[str, tuple[SealedSafetensors, Any]] = {}

    def add_plain(self, buf: Any, source: str) -> None:
        for name, dtype, shape, raw in tensor_views(buf, source):
            self._add(name, dtype, shape, source)
            self._plain[name] = raw

    def add_sealed(self, art: SealedSafetensors) -> None:
        for e in art.entries:
            self._add(e.name, e.info["dtype"], list(e.info["shape"]), str(art.path))
            self._sealed[e.name] = (art, e)

    def _add(self, name: str, dtype: str, shape: list[int], source: str) -> None:
        if name in self.info:
            raise UsageError(f"tensor {name[:80]!r} appears twice in {source}'s model")
        self.info[name] = (dtype, shape)

    def read(self, name: str) -> np.ndarray:
        """The tensor's raw bytes (uint8)."""
        if name in self._plain:
            return self._plain[name]
        art, entry = self._sealed[name]
        out = np.empty(entry.length, np.uint8)
        art.decrypt_many([(entry, out.data)])
        return out

    def forget(self) -> None:
        self._plain.clear()
        self._sealed.clear()

    def done(self, name: str, raw: np.ndarray) -> None:
        """Wipe a decrypted tensor (plain ones are the caller's files, left alone)."""
        if name in self._sealed:
            keys.wipe(raw.data)


@contextmanager
def open_tensors(path: str | os.PathLike[str], identity: IdentitySpec | None = None) -> Iterator[Tensors]:
    """Every tensor of ``path``: a safetensors file, a ``.pt``/``.pth``/``.bin`` state dict, a directory
    of those, or the sealed form of any (opened with ``identity``)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p} does not exist")
    found = Tensors()
    with ExitStack() as stack:
        if p.is_dir():
            files = [rel for rel in list_members(p) if rel.lower().endswith((".safetensors", *CHECKPOINT_SUFFIXES))]
            if not files:
                raise UsageError(f"{p} holds no .safetensors or .pt/.pth/.bin weights")
            if _is_sealed(p / files[0]):
                ident = resolve_identity(identity)

                def member(loc: str | Path, cache: dict[bytes, bytearray]) -> Any:
                    return open_artifact(loc, ident, dek_cache=cache)

                for art in stack.enter_context(open_sealed_dir(p, member)).values():
                    if isinstance(art, SealedSafetensors):
                        found.add_sealed(art)
            else:
                for rel in files:
                    _add_plain_file(found, p / rel, stack)
        elif _is_sealed(p):
            art = stack.enter_context(open_artifact(p, identity))
            if not isinstance(art, SealedSafetensors):
                raise UsageError(f"{p} is a sealed bundle, not sealed tensors: only tensor formats carry fingerprints")
            found.add_sealed(art)
        else:
            _add_plain_file(found, p, stack)
        stack.callback(found.forget)  # runs first: drops the views before the mappings close
        yield found


def _is_sealed(path: Path) -> bool:
    try:
        with open_locked(path):
            return True
    except NotSealedError:
        return False


def _add_plain_file(found: Tensors, path: Path, stack: ExitStack) -> None:
    if path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        from modelseal.sealing.convert import checkpoint_to_safetensors

        found.add_plain(checkpoint_to_safetensors(path), str(path))
        return
    if not path.name.lower().endswith(".safetensors"):
        raise UsageError(
            f"{path} is not a tensor format (.safetensors, .pt/.pth/.bin, or a directory of them): "
            "only tensors carry fingerprints"
        )
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    if isinstance(mm, mmap.mmap):
        stack.callback(_unmap, mm)
    found.add_plain(mm, str(path))


def _unmap(mm: mmap.mmap) -> None:
    """Close a mapping; while an array (a traceback's frame, say) still views it, the mapping goes with
    the last view instead."""
    try:
        mm.close()
    except BufferError:
        pass


# --- the residual ---------------------------------------------------------------------------------------


@dataclass
class Residual:
    """The suspect's normalised differences at the selected positions, tensor by tensor."""

    names: list[str] = field(default_factory=list)
    parts: list[np.ndarray] = field(default_factory=list)  # float32, 0 where a position is not usable
    missing: list[str] = field(default_factory=list)  # fingerprinted tensors the suspect lacks (or reshaped)
    reshaped: list[str] = field(default_factory=list)  # of those, the ones it holds in another shape
    aligned: list[str] = field(default_factory=list)  # tensors whose units were permuted or rescaled (undone)
    compared: int = 0  # positions where both copies hold a usable value

    @property
    def vector(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0, np.float32)

    def layout(self) -> list[tuple[str, int]]:
        return [(n, p.size) for n, p in zip(self.names, self.parts, strict=True)]


def _gather(raw: np.ndarray, dtype: str, idx: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (raw.view("<u2")[idx].astype(np.uint32) << 16).view(np.float32)
    return raw.view({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype])[idx].astype(np.float32)


def residual(
    original: Tensors, suspect: Tensors, key: FingerprintKey, progress: Progress | None = None
) -> Residual:
    """The residual of ``suspect`` against ``original`` at ``key``'s positions (see the module docstring)."""
    out = Residual()
    targets = sorted(n for n, (dtype, shape) in original.info.items() if eligible(dtype, shape))
    if not targets:
        raise UsageError("the original model has no tensor that can carry a fingerprint: is it the right model?")
    for name in targets:
        dtype, shape = original.info[name]
        if name not in suspect.info or suspect.info[name][0] not in FLOAT_DTYPES:
            out.missing.append(name)
            continue
        sdtype, sshape = suspect.info[name]
        if sshape != shape:  # a padded vocabulary, an added token: the other tensors still carry the marks
            out.missing.append(name)
            out.reshaped.append(name)
            continue
        raw = original.read(name)
        idx = positions(key, name, shape)
        values = as_float32(raw, dtype)
        step = steps(values, shape, idx)
        base = values[idx]
        sraw = suspect.read(name)
        # units permuted or rescaled (the function unchanged) are put back in the original's layout first
        aligned, how = align(values.reshape(shape), as_float32(sraw, sdtype).reshape(shape))
        seen = aligned.reshape(-1)[idx] if how.changed else _gather(sraw, sdtype, idx)
        if how.changed:
            out.aligned.append(name)
        del values, aligned
        original.done(name, raw)
        suspect.done(name, sraw)
        usable = (step > 0) & np.isfinite(seen) & (seen != 0)
        diff = (seen - base) / np.where(usable, step, np.float32(1))
        out.compared += int(np.count_nonzero(usable))
        out.names.append(name)
        out.parts.append(np.where(usable, np.clip(diff, -CLIP, CLIP), 0).astype(np.float32))
        if progress is not None:
            progress(raw.nbytes)
    if not out.parts:
        raise UsageError("the suspect holds none of the original's fingerprinted tensors (different model or names?)")
    return out


# --- scores ---------------------------------------------------------------------------------------------


class Patterns:
    """Candidates' ±1 patterns over a residual's layout, as int8 rows (one matrix product scores them all)."""

    def __init__(self, key: FingerprintKey, layout: Sequence[tuple[str, int]], licences: Sequence[str]) -> None:
        self.licences = list(licences)
        self.layout = list(layout)
        width = sum(k for _n, k in self.layout)
        self.rows = np.empty((len(self.licences), width), np.int8)
        for i, licence in enumerate(self.licences):
            at = 0
            for name, k in self.layout:
                self.rows[i, at : at + k] = sign_bits(key, licence, name, k)
                at += k
        self.rows *= 2
        self.rows -= 1

    def scores(self, r: np.ndarray) -> np.ndarray:
        """``<r, s> / ||r||`` for every candidate (0 for an empty residual: no evidence either way)."""
        norm = float(np.sqrt(np.dot(r.astype(np.float64), r)))
        out = np.zeros(len(self.licences))
        if norm == 0:
            return out
        for at in range(0, len(self.licences), _CHUNK):
            out[at : at + _CHUNK] = self.rows[at : at + _CHUNK].astype(np.float32) @ r / norm
        return out


@dataclass
class Score:
    licence: str
    score: float


@dataclass
class TraceResult:
    """Who the suspect was sealed for, if anyone passes the threshold."""

    verdict: str  # "identified" or "no licensee identified"
    licence: str | None  # the best candidate when identified
    score: float  # its score (the best score when not identified)
    threshold: float
    alpha: float
    candidates: int
    implicated: list[str]  # every candidate over the threshold, best first (two or more: collusion)
    top: list[Score]
    log10_false_accusation_bound: float  # for the best candidate: log10 of C * exp(-z^2/2)
    positions: int  # positions compared (both copies usable there)
    tensors: int
    missing_tensors: int
    key_id: str

    @property
    def identified(self) -> bool:
        return self.licence is not None


def unique_candidates(candidates: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(check_licence(c) for c in candidates))
    if not out:
        raise UsageError("no candidate licence ids given")
    return out


def score(found: Residual, key: FingerprintKey, candidates: Sequence[str], alpha: float = ALPHA) -> TraceResult:
    """Score ``candidates`` on a residual and decide (see the module docstring for the threshold).

    Patterns are made per chunk of candidates and per tensor, so memory stays at one chunk's bits for
    one tensor (256 x 65,536 at most) however large the model and the candidate list.
    """
    names = unique_candidates(candidates)
    norm = float(np.sqrt(sum(np.dot(p.astype(np.float64), p) for p in found.parts)))
    z = np.zeros(len(names))
    if norm > 0:
        for name, r in zip(found.names, found.parts, strict=True):
            total = float(r.sum(dtype=np.float64))
            for at in range(0, len(names), _CHUNK):
                bits = np.stack([sign_bits(key, c, name, r.size) for c in names[at : at + _CHUNK]])
                z[at : at + _CHUNK] += 2 * (bits.astype(np.float32) @ r).astype(np.float64) - total
        z /= norm
    return decide(z, names, found, key, alpha)


def decide(z: np.ndarray, names: list[str], found: Residual, key: FingerprintKey, alpha: float) -> TraceResult:
    """The verdict on scores ``z`` of ``names``."""
    limit = threshold(len(names), alpha)
    order = np.argsort(-z, kind="stable")
    best = int(order[0])
    implicated = [names[i] for i in order if z[i] >= limit]
    return TraceResult(
        verdict="identified" if implicated else "no licensee identified",
        licence=names[best] if implicated else None,
        score=float(z[best]),
        threshold=limit,
        alpha=alpha,
        candidates=len(names),
        implicated=implicated,
        top=[Score(names[i], float(z[i])) for i in order[:5]],
        log10_false_accusation_bound=log10_bound(float(z[best]), len(names)),
        positions=found.compared,
        tensors=len(found.parts),
        missing_tensors=len(found.missing),
        key_id=key.key_id,
    )


def trace(
    suspect: str | os.PathLike[str],
    original: str | os.PathLike[str],
    key: FingerprintKey,
    candidates: Sequence[str],
    *,
    identity: IdentitySpec | None = None,
    alpha: float = ALPHA,
    progress: Progress | None = None,
) -> TraceResult:
    """Name the licence ``suspect`` was fingerprinted for, among ``candidates``, or nobody.

    ``suspect`` and ``original`` are safetensors files, state-dict checkpoints, directories of them, or
    sealed (opened with ``identity``). ``progress`` is advanced by the original's bytes as they are read.
    """
    names = unique_candidates(candidates)
    with open_tensors(original, identity) as orig, open_tensors(suspect, identity) as sus:
        found = residual(orig, sus, key, progress)
    return score(found, key, names, alpha)


def eligible_bytes(original: str | os.PathLike[str]) -> int:
    """The original's size in bytes, for a progress bar's total."""
    p = Path(original)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0
