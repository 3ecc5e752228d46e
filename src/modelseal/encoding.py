"""Small, strict encodings shared by the format and the key files.

Base64url without padding is used for every binary value inside JSON; decoding is strict so that a
malformed value is a :class:`FormatError`, never a silently different byte string.
"""

from __future__ import annotations

import base64
import binascii
import struct

from modelseal.errors import FormatError


def b64e(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: object, *, what: str = "value", length: int | None = None) -> bytes:
    """Decode unpadded base64url strictly; raise FormatError naming ``what`` if it is not valid."""
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise FormatError(f"{what} is not an unpadded base64url string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what} is not valid base64url") from exc
    if b64e(raw) != text:
        raise FormatError(f"{what} is not canonical base64url")
    if length is not None and len(raw) != length:
        raise FormatError(f"{what} must be {length} bytes, found {len(raw)}")
    return raw


def lp(data: bytes) -> bytes:
    """Length-prefix ``data`` with a big-endian u32 so concatenations are unambiguous."""
    return struct.pack(">I", len(data)) + data
