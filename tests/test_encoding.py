"""The header's base64url decoder: strict, canonical, and the same verdict as the standard library's."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError


def _reference(text: str) -> bytes | None:
    """What the earlier decoder accepted: the base64 module, then a canonical round trip."""
    if not text.isascii() or "=" in text:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == text else None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \n.é", max_size=24))
def test_decoder_agrees_with_the_reference(text: str) -> None:
    expected = _reference(text)
    if expected is None:
        with pytest.raises(FormatError):
            b64d(text)
    else:
        assert b64d(text) == expected


@given(st.binary(max_size=80))
def test_round_trip(data: bytes) -> None:
    assert b64d(b64e(data)) == data
    assert b64e(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("bad", ["AB", "A", "AB+C", "AB/C", "ABC=", " ABC", "AB\nC", "ABé", "AB.C"])
def test_non_canonical_or_foreign_text_is_refused(bad: str) -> None:
    with pytest.raises(FormatError):
        b64d(bad)
