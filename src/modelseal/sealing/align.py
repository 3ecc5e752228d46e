"""Undoing the function-preserving transforms an attacker can apply to a copy before it is traced.

A network computes the same function when the units of a hidden layer are permuted (the rows of one
weight tensor and the matching input columns of the next) and, behind a ReLU, when a unit's incoming
weights are scaled by ``c`` and its outgoing ones by ``1/c``. Such a copy has every weight of the
licensee's copy, at other positions and scales, so a trace that compares fixed positions scores it as
unmarked. :func:`align` puts a suspect tensor back in the original's layout first:

1. **Rows** (dimension 0) are matched by signatures that neither the columns' order nor any row or
   column scale changes: the log-magnitudes of the tensor, *double-centred* (row and column means taken
   out, which removes every per-row and per-column scale, since a scale is an added constant in log
   space), each row's values sorted and summarised as quantiles. Each suspect row goes to its most
   similar original row, accepted only when the matching is a permutation.
2. **Columns** (dimension 1, with any trailing dimensions: a convolution's input channels) the same way.
3. **Scales**: per row, then per column, the median ratio of suspect to original over entries of some
   size (robust to the marks, which move 2% of entries by 1% of a row's RMS).

Only the original and the suspect are used, never a candidate's pattern, so the residual stays
independent of an innocent licensee's signs and the trace's false-accusation bound (Hoeffding over
the signs) holds unchanged. A tensor already in place is returned untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = 48  # the length of a row's (or column's) order-free signature
IN_PLACE = 0.9  # a row whose correlation with the original's row at its index is at least this stays put
SCALE_TOLERANCE = 1e-3  # relative: scales closer to 1 than this are left alone (float rounding, casts)
POLISH_PASSES = 60  # row and column scale passes at most
CONVERGED = 1e-5  # once rescaling has begun, it goes on until the scales are this close to 1
LOW_CUT = 0.25  # signatures leave out each row's smallest quarter


@dataclass(frozen=True)
class Alignment:
    """What :func:`align` undid: ``rows_moved`` and ``columns_moved`` (how many), ``rescaled``."""

    rows_moved: int = 0
    columns_moved: int = 0
    rescaled: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.rows_moved or self.columns_moved or self.rescaled)


def align(original: np.ndarray, suspect: np.ndarray) -> tuple[np.ndarray, Alignment]:
    """``suspect`` (float32, the original's shape) rearranged and rescaled into the original's layout,
    and what was undone; the array itself when nothing needed undoing."""
    if original.ndim < 2 or original.shape != suspect.shape:
        return suspect, Alignment()
    o = original.reshape(original.shape[0], original.shape[1], -1).astype(np.float32, copy=False)
    s = suspect.reshape(o.shape).astype(np.float32, copy=False)
    rows = _order(o, s, axis=0)
    if rows is not None:
        s = s[rows]
    columns = _order(o, s, axis=1)
    if columns is not None:
        s = s[:, columns]
    s, rescaled = _rescale(o, s)
    done = Alignment(
        int(np.count_nonzero(rows != np.arange(rows.size))) if rows is not None else 0,
        int(np.count_nonzero(columns != np.arange(columns.size))) if columns is not None else 0,
        rescaled,
    )
    if not done.changed:
        return suspect, done
    return s.reshape(suspect.shape), done


def _slices(t: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as a matrix whose rows are its slices along ``axis`` (0: rows, 1: columns)."""
    return t.reshape(t.shape[0], -1) if axis == 0 else np.moveaxis(t, 1, 0).reshape(t.shape[1], -1)


def _order(o: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray | None:
    """For each of the original's slices along ``axis``, the suspect slice that is it; None when they are
    in place already or no one-to-one matching is found (then nothing is moved)."""
    a, b = _slices(o, axis), _slices(s, axis)
    if a.shape[0] < 2 or a.shape[1] < 2:
        return None
    if np.all(_in_place(a, b) >= IN_PLACE):
        return None
    sa, sb = _signatures(_log_centred(a)), _signatures(_log_centred(b))
    best = np.empty(sa.shape[0], dtype=np.int64)
    for start in range(0, sa.shape[0], 1024):  # blocks: an n x n similarity matrix would not fit for a vocabulary
        best[start : start + 1024] = np.argmax(sa[start : start + 1024] @ sb.T, axis=1)
    if np.unique(best).size != best.size:
        return None  # not a permutation: leave the tensor as it is rather than guess
    return best


def _in_place(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each slice's correlation with the suspect's slice at the same index."""
    a0, b0 = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", a0, b0)
    den = np.sqrt(np.einsum("ij,ij->i", a0, a0) * np.einsum("ij,ij->i", b0, b0))
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


def _log_centred(m: np.ndarray) -> np.ndarray:
    """``log |m|``, double-centred by means: any per-row and per-column scale of ``m`` is gone exactly, and
    a permutation of its rows or columns permutes the result the same way. (A mark on a tiny weight is a
    large change in log space; it moves a mean a little, and :func:`_signatures` reads only the upper
    part of each row.)"""
    logs = np.log(np.maximum(np.abs(m), np.float32(1e-30)), dtype=np.float32)
    logs -= logs.mean(axis=1, keepdims=True)
    logs -= logs.mean(axis=0, keepdims=True)
    return logs


def _signatures(m: np.ndarray) -> np.ndarray:
    """Order-free summaries of each row: quantiles of its sorted values, centred over the rows and
    normalised (rows of one tensor differ in these; a row moved keeps its own)."""
    ordered = np.sort(m, axis=1)
    low = int(m.shape[1] * LOW_CUT)  # the smallest magnitudes: where marks move logs the most
    picks = np.linspace(low, m.shape[1] - 1, min(QUANTILES, m.shape[1] - low)).round().astype(np.int64)
    q = ordered[:, picks]
    q = q - q.mean(axis=1, keepdims=True)  # a shift of a whole row says nothing about which row it is
    q = q - q.mean(axis=0, keepdims=True)  # nor does what rows share
    return np.asarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30), dtype=np.float32)


def _scales(o: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """Each slice's scale (suspect over original) along ``axis``: the geometric mean of the ratios over
    entries above the slice's median magnitude, where a mark moves a ratio by about 1% at most (1 where
    there is no such entry). A mean, not a median: the ratios of a slice are its scale times the other
    axis's scales, often two or three values, and a median would settle on one of them."""
    a, b = _slices(o, axis), _slices(s, axis)
    big = (np.abs(a) >= np.median(np.abs(a), axis=1, keepdims=True)) & (a != 0) & (b != 0)
    logs = np.log(np.abs(np.where(big, b, 1)) / np.abs(np.where(big, a, 1)))
    counts = big.sum(axis=1)
    mean = np.where(counts > 0, logs.sum(axis=1) / np.maximum(counts, 1), 0.0)
    scale = np.exp(mean)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)


def _rescale(o: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, bool]:
    """Divide out per-row and per-column scales, alternately (each pass's means also hold part of the
    other axis's scales): nothing when every scale is within :data:`SCALE_TOLERANCE` of 1, else until
    they are within :data:`CONVERGED`."""
    rescaled = False
    for _ in range(POLISH_PASSES):
        moved = False
        for axis in (0, 1):
            scale = _scales(o, s, axis)
            if np.all(np.abs(scale - 1) <= (CONVERGED if rescaled else SCALE_TOLERANCE)):
                continue
            moved = rescaled = True
            shape = [1] * s.ndim
            shape[axis] = -1
            s = s / scale.reshape(shape)
        if not moved:
            break
    return s, rescaled
