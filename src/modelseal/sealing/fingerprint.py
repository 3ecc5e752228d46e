"""Per-licensee fingerprints: a keyed, licence-specific pattern of tiny weight changes, added at seal time.

The owner holds one secret (the *fingerprint key*). From it, HKDF-SHA256 (``cryptography``'s, nothing
home-made) derives two independent subkeys:

* **positions**: per eligible tensor (a floating-point weight of two or more dimensions with at least
  :data:`MIN_ELEMENTS` elements; 1-D norms and biases are left alone), a secret sample of
  :data:`DENSITY` of its elements, at most :data:`MAX_PER_TENSOR`. The same positions for every licence,
  so the trace compares every candidate on the same residual.
* **signs**: per (licence id, tensor), a ±1 pattern over those positions.

The copy for licence L moves each selected weight ``w`` by ``sign * DELTA * rms(row)``, where ``row`` is
the weight's output row (output channel, for a conv kernel): a per-row scale keeps the change the same
small fraction of every unit's weights, whatever their magnitude, while staying large against int8
quantisation's step (which is per tensor or per row too). The new value is rounded to the tensor's own
dtype; if rounding would undo the change (bf16 at large ``|w|``), the value moves one ULP in the sign's
direction instead, so every selected weight carries its sign. Weights that are exactly zero are never
touched (a non-zero value among a sparse model's zeros would show where the pattern lies).

Per tensor the key streams come from ``numpy.random.PCG64`` seeded with HKDF output, read through
``random_raw`` (the bit generator's raw 64-bit words, which numpy keeps stable across versions, unlike
``Generator`` methods): a trace years later selects the same positions and signs as the seal did.

Budget: the change is ``DELTA * sqrt(DENSITY)``, 0.14% of each row's norm, less than casting fp32
weights to bf16 moves them (about 0.2%); bench/fingerprint.py measures the output change (at most the bf16
cast's on a transformer encoder and a CNN: docs/fingerprinting.md). Detection does not need more: a
licensee's own copy scores about ``sqrt(positions)`` whatever ``DELTA`` is, and int8 quantisation's
rounding noise stays below the step. The tracing side (statistics, thresholds) is
:mod:`modelseal.sealing.trace`.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from modelseal import keyfile
from modelseal.errors import FormatError, KeyFileError, UsageError
from modelseal.format import safetensors as sst

LABEL = "MODELSEAL-FINGERPRINT-KEY"
SCHEME = b"modelseal-fingerprint/1"
DELTA = 0.01  # the change, in units of the weight row's RMS
DENSITY = 0.02  # share of an eligible tensor's elements that carry the pattern
MAX_PER_TENSOR = 1 << 16  # a trace's cost grows with positions x candidates: 2^16 per tensor is plenty
MIN_ELEMENTS = 256  # smaller tensors (tiny heads, per-channel scales) are skipped
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MIN_KEY_BYTES = 16
KEY_BYTES = 32
_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


@dataclass(frozen=True, repr=False)
class FingerprintKey:
    """The owner's fingerprint secret. Its ``repr`` and every message show :attr:`key_id` only."""

    _secret: bytes
    _subkeys: dict[bytes, bytes] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self._secret) < MIN_KEY_BYTES:
            raise KeyFileError(f"a fingerprint key needs at least {MIN_KEY_BYTES} bytes of secret")

    def __repr__(self) -> str:
        return f"FingerprintKey(id={self.key_id})"

    @classmethod
    def generate(cls) -> FingerprintKey:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def load(cls, spec: str | os.PathLike[str]) -> FingerprintKey:
        """A key from a file written by :meth:`save` (``modelseal fingerprint keygen``), or ``env:VAR``
        whose value is that file's text or the bare base64 key. Never the key itself: a command line
        shows in ``ps``."""
        text = os.fspath(spec)
        if text.startswith("env:"):
            var = text[4:]
            value = os.environ.get(var)
            if not value:
                raise KeyFileError(f"environment variable {var!r} (--fingerprint-key env:{var}) is not set")
            return cls(_parse(value if ":" in value else f"{LABEL}:{value.strip()}", f"${var}"))
        return cls(_parse(keyfile.read_text(text), f"fingerprint key file {keyfile.shown_value(text)}"))

    def save(self, path: str | os.PathLike[str], force: bool = False) -> None:
        """Write the key file, mode 0600 (refuses to overwrite unless ``force``)."""
        keyfile.write_secret(path, LABEL, self._secret, [f"modelseal fingerprint key (id {self.key_id})"], force)

    @property
    def key_id(self) -> str:
        """A public name for the key (16 hex digits), to tell keys apart in records and reports."""
        return self._subkey(b"key-id").hex()[:16]

    def _subkey(self, purpose: bytes) -> bytes:
        if purpose not in self._subkeys:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=SCHEME, info=SCHEME + b"/" + purpose)
            self._subkeys[purpose] = hkdf.derive(self._secret)
        return self._subkeys[purpose]

    def stream(self, purpose: bytes, *parts: str) -> np.random.PCG64:
        """A PCG64 bit generator seeded by HKDF-Expand(subkey ``purpose``, the length-prefixed ``parts``)."""
        info = b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts)
        seed = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(self._subkey(purpose))
        return np.random.PCG64(int.from_bytes(seed, "big"))


def _parse(text: str, source: str) -> bytes:
    for label, value in keyfile.key_lines(text, source):
        if label == LABEL:
            return value
    raise KeyFileError(f"{source} holds no {LABEL} line (make one with `modelseal fingerprint keygen`)")


@dataclass(frozen=True)
class Fingerprint:
    """What one sealed copy carries: the owner's key and the licence id it is made for."""

    key: FingerprintKey
    licence: str

    def __post_init__(self) -> None:
        check_licence(self.licence)


def check_licence(licence: str) -> str:
    if not licence or len(licence) > 256 or not licence.isprintable() or licence != licence.strip():
        raise UsageError("a licence id must be 1 to 256 printable characters without surrounding spaces")
    return licence


# --- which weights carry the pattern ---------------------------------------------------------------------


def eligible(dtype: str, shape: list[int]) -> bool:
    """Floating-point weights of >= 2 dimensions and at least :data:`MIN_ELEMENTS` elements."""
    return dtype in FLOAT_DTYPES and len(shape) >= 2 and math.prod(shape) >= MIN_ELEMENTS


def count(numel: int) -> int:
    return min(numel, MAX_PER_TENSOR, max(1, math.ceil(DENSITY * numel)))


def positions(key: FingerprintKey, name: str, shape: list[int]) -> np.ndarray:
    """The sorted flat indices of ``name``'s selected elements: distinct, uniform, from the key's stream.

    Raw 64-bit words reduced modulo the element count (bias at most count / 2^64: nil), first
    occurrences kept, drawn again until there are enough: O(selected), never a permutation of the tensor.
    """
    numel = math.prod(shape)
    k = count(numel)
    bits = key.stream(b"positions", name, ",".join(map(str, shape)))
    chosen = np.empty(0, np.int64)
    while chosen.size < k:
        draw = (bits.random_raw(k - chosen.size + 16) % np.uint64(numel)).astype(np.int64)
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)][:k]
    return np.sort(chosen)


def sign_bits(key: FingerprintKey, licence: str, name: str, k: int) -> np.ndarray:
    """Licence ``licence``'s pattern on tensor ``name``: ``k`` bits, 1 for +1 and 0 for -1 (uint8)."""
    words = key.stream(b"signs", licence, name).random_raw(-(-k // 64))
    return np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:k]


def signs(key: FingerprintKey, licence: str, name: str, k: int) -> np.ndarray:
    """The same pattern as ±1.0 (float32)."""
    return sign_bits(key, licence, name, k).astype(np.float32) * 2 - 1


# --- dtypes ----------------------------------------------------------------------------------------------


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor's raw little-endian bytes (uint8) as float32 values (bf16 widened exactly; an F32 tensor
    is a view of ``raw``, not a copy: read it, do not write it)."""
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.dtype(_NUMPY[dtype]).newbyteorder("<")).astype(np.float32, copy=False)


def steps(values: np.ndarray, shape: list[int], idx: np.ndarray) -> np.ndarray:
    """The change at each selected position: ``DELTA * rms`` of its output row (float32), 0 where the
    position must not move (the weight is zero or not finite, or its row's RMS is not usable)."""
    rows = values.reshape(shape[0], -1)
    with np.errstate(over="ignore", invalid="ignore"):  # a row holding inf or nan gets no usable step
        rms = np.sqrt(np.square(rows).sum(axis=1, dtype=np.float64) / rows.shape[1])
    step = (DELTA * rms[idx // rows.shape[1]]).astype(np.float32)
    here = values[idx]
    usable = np.isfinite(here) & (here != 0) & np.isfinite(step) & (step > 0)
    return np.where(usable, step, np.float32(0))


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def perturb(raw: np.ndarray, dtype: str, idx: np.ndarray, delta: np.ndarray) -> None:
    """Add ``delta`` (float32, signed; 0 = leave) at ``idx`` of the tensor whose bytes ``raw`` are, in
    its own dtype, in place. A change that rounds away moves one ULP in its direction; one that would
    overflow is dropped."""
    move = delta != 0
    idx, delta = idx[move], delta[move]
    if dtype == "BF16":
        bits = raw.view("<u2")
        old_bits = bits[idx]
        old = (old_bits.astype(np.uint32) << 16).view(np.float32)
        new_bits = _bf16_round(old + delta)
        stuck = new_bits == old_bits
        away = (delta > 0) == (old > 0)  # the step's direction increases |old|: the next bit pattern up
        new_bits[stuck] = np.where(away[stuck], old_bits[stuck] + 1, old_bits[stuck] - 1).astype(np.uint16)
        ok = np.isfinite((new_bits.astype(np.uint32) << 16).view(np.float32))
        bits[idx[ok]] = new_bits[ok]
        return
    typed = raw.view(np.dtype(_NUMPY[dtype]).newbyteorder("<"))
    old = typed[idx]
    new = (old.astype(np.float64) + delta).astype(typed.dtype)
    stuck = new == old
    new[stuck] = np.nextafter(old[stuck], np.where(delta[stuck] > 0, np.inf, -np.inf).astype(typed.dtype))
    ok = np.isfinite(new)
    typed[idx[ok]] = new[ok]


# --- a safetensors buffer --------------------------------------------------------------------------------


@dataclass
class Marked:
    """What :func:`apply` changed: tensors and positions carrying the pattern."""

    tensors: int
    positions: int


def tensor_views(buf: Any, source: str) -> list[tuple[str, str, list[int], np.ndarray]]:
    """(name, dtype, shape, raw uint8 view) of every tensor of a plain safetensors buffer (writable views
    of a writable buffer)."""
    header, start = sst.parse_plain_header(buf, source)
    meta = header.get("__metadata__") or {}
    if "modelseal" in meta:
        raise FormatError(f"{source} is already sealed: fingerprint the plaintext model")
    out = []
    for e in sst.tensor_entries(header, source):
        begin, end = e["offsets"]
        if start + end > len(buf):
            raise FormatError(f"{source}: tensor {e['name'][:80]!r} runs past the end of the file (truncated?)")
        raw = np.frombuffer(buf, dtype=np.uint8, count=end - begin, offset=start + begin)
        out.append((e["name"], e["dtype"], list(e["shape"]), raw))
    return out


def apply(buf: bytearray, fingerprint: Fingerprint, source: str) -> Marked:
    """Mark the plaintext safetensors bytes ``buf`` in place with ``fingerprint``'s pattern (a file with
    no eligible tensor, a directory's tokenizer shard say, is left as it is: the caller decides)."""
    marked = Marked(0, 0)
    tied: dict[bytes, np.ndarray] = {}  # what a tensor held before marking -> its marked bytes
    for name, dtype, shape, raw in tensor_views(buf, source):
        if not eligible(dtype, shape):
            continue
        before = hashlib.sha256(f"{dtype}{shape}".encode() + raw.data).digest()
        if before in tied:  # a tied weight written twice: both copies carry the same marks, or the
            raw[...] = tied[before]  # positions where they differ would show where the marks are
            continue
        tied[before] = raw
        idx = positions(fingerprint.key, name, shape)
        step = steps(as_float32(raw, dtype), shape, idx)
        perturb(raw, dtype, idx, step * signs(fingerprint.key, fingerprint.licence, name, idx.size))
        marked.tensors += 1
        marked.positions += int(np.count_nonzero(step))
    return marked


def nothing_marked(source: str) -> UsageError:
    return UsageError(
        f"{source} has no tensor that can carry a fingerprint (floating-point, >= 2 dimensions, "
        f">= {MIN_ELEMENTS} elements)"
    )
