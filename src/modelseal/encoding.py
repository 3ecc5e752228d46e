"""Small, strict encodings shared by the format and the key files.

Base64url without padding is used for every binary value inside JSON; decoding is strict so that a
malformed value is a :class:`FormatError`, never a silently different byte string.
"""

from __future__ import annotations

import binascii
import struct

from modelseal.errors import FormatError

_TO_STANDARD = str.maketrans("-_", "+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64e(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def b64d(text: object, *, what: str = "value", length: int | None = None) -> bytes:
    """Decode unpadded base64url strictly; raise FormatError naming ``what`` if it is not valid.

    ``binascii`` directly (the ``base64`` module's wrappers cost more than the decoding for the short
    values of a header, nine of which every load reads): strict mode refuses any character outside
    the alphabet, and the round trip refuses the rest (``+``/``/``, non-zero trailing bits).
    """
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise FormatError(f"{what} is not an unpadded base64url string")
    try:
        raw = binascii.a2b_base64(text.translate(_TO_STANDARD) + "=" * (-len(text) % 4), strict_mode=True)
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
