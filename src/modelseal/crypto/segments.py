"""Segmented AES-256-GCM: how one entry's bytes become ciphertext segments with detached tags.

An entry (a tensor, or a file inside a bundle) is cut into segments of ``segment_size`` bytes; the last
one may be shorter, and an empty entry is one empty segment (so its existence is authenticated too).
Ciphertext has exactly the plaintext's length and stays at the plaintext's offset; the 16-byte tags
live in a separate region. Nonces are derived from (entry ordinal, segment index), which is safe
because every artifact has its own payload key (see ``keys.py``). The AAD binds model id, model
version, entry name, segment index and a last-segment flag, so swapping, reordering, truncating or
extending segments, entries or models is detected.

Decryption runs in place: the loader reads a segment's ciphertext straight into its final buffer
(``pread`` from the page cache) and OpenSSL's streaming GCM interface, which releases the GIL and
takes the tag separately, turns it into plaintext there. No other copy of the data is made. (OpenSSL
documents exact in-place operation as supported; only partial overlap is undefined.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.crypto.keys import wipe
from modelseal.encoding import lp
from modelseal.errors import AuthenticationError

TAG_SIZE = 16
DEFAULT_SEGMENT_SIZE = 4 << 20
MIN_SEGMENT_SIZE = 4 << 10
MAX_SEGMENT_SIZE = 1 << 30
_AAD_DOMAIN = b"modelseal/1 segment"
# OpenSSL's update_into needs len(out) >= len(in) + 15 even for GCM, which writes only len(in) bytes.
_SLACK = 15


@dataclass(frozen=True)
class Segment:
    """One segment of one entry: where its ciphertext lies and which tag authenticates it."""

    ordinal: int  # the entry's position in the artifact's index
    name: str  # the entry's name (tensor name or bundle path)
    index: int  # segment number within the entry
    final: bool  # last segment of the entry
    offset: int  # byte offset of the segment's ciphertext within the payload
    length: int
    tag_index: int  # position of its tag in the tag region


def nonce(ordinal: int, index: int) -> bytes:
    """The 96-bit nonce of segment ``index`` of entry ``ordinal``: u32 ordinal || u64 index (BE)."""
    return struct.pack(">IQ", ordinal, index)


def aad(model_id: str, model_version: str, name: str, index: int, final: bool) -> bytes:
    """The associated data that binds a segment to its model, version, entry and position."""
    return b"".join(
        (
            lp(_AAD_DOMAIN),
            lp(model_id.encode()),
            lp(model_version.encode()),
            lp(name.encode()),
            struct.pack(">QB", index, 1 if final else 0),
        )
    )


def plan_entry(ordinal: int, name: str, offset: int, length: int, segment_size: int, first_tag: int) -> list[Segment]:
    """Cut one entry at ``offset`` of ``length`` bytes into segments whose tags start at ``first_tag``."""
    count = max(1, -(-length // segment_size))
    segments = []
    for i in range(count):
        start = i * segment_size
        seg_len = min(segment_size, length - start)
        segments.append(Segment(ordinal, name, i, i == count - 1, offset + start, seg_len, first_tag + i))
    return segments


def segment_count(length: int, segment_size: int) -> int:
    """How many segments (and tags) an entry of ``length`` bytes has."""
    return max(1, -(-length // segment_size))


class SegmentCipher:
    """Encrypts and decrypts the segments of one artifact under its payload key."""

    def __init__(self, payload_key: bytes, model_id: str, model_version: str) -> None:
        self._key = payload_key
        self._aead = AESGCM(payload_key)
        self.model_id = model_id
        self.model_version = model_version

    def _aad(self, seg: Segment) -> bytes:
        return aad(self.model_id, self.model_version, seg.name, seg.index, seg.final)

    def encrypt_into(self, seg: Segment, plaintext: memoryview | bytes, out: memoryview) -> memoryview:
        """Encrypt one segment into the caller's ``out``; return the view of ``out`` holding ciphertext || tag.

        ``out`` may be longer than ``seg.length + TAG_SIZE`` (a worker's buffer of one full segment, reused
        for every segment it seals): ``AESGCM.encrypt_into`` wants a buffer of exactly that size, so it gets
        the front of ``out``. Nothing is allocated per segment, which matters: a fresh ciphertext object per
        4 MiB segment costs page faults on every one of its pages, several times the encryption itself.
        """
        sealed = out[: seg.length + TAG_SIZE]
        self._aead.encrypt_into(nonce(seg.ordinal, seg.index), plaintext, self._aad(seg), sealed)
        return sealed

    def decrypt_in_place(self, seg: Segment, buf: memoryview, tag: bytes) -> None:
        """Turn one segment's ciphertext in ``buf`` into plaintext and check its tag.

        On a bad tag ``buf`` is zeroed before :class:`AuthenticationError` is raised, so no
        unauthenticated plaintext survives.
        """
        n = len(buf)
        dec = Cipher(algorithms.AES(self._key), modes.GCM(nonce(seg.ordinal, seg.index), tag)).decryptor()
        dec.authenticate_additional_data(self._aad(seg))
        head = n - _SLACK if n > _SLACK else 0
        if head:
            dec.update_into(buf[:head], buf)  # the output view may be longer; GCM writes exactly ``head``
        if n - head:
            tail = bytearray(n - head + _SLACK)
            dec.update_into(buf[head:], tail)
            buf[head:] = tail[: n - head]
            wipe(tail)
        try:
            dec.finalize()
        except InvalidTag:
            wipe(buf)
            raise AuthenticationError(
                f"entry {seg.name!r} segment {seg.index} failed authentication: the file is corrupt, "
                "tampered with, truncated, or belongs to another model or version"
            ) from None
