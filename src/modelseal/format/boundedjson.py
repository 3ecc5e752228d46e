"""One JSON reader for every document the sealed formats read, with size and depth limits.

``json.loads`` recurses in C for every nested array or object: a header of a few thousand ``[`` raises
``RecursionError`` (not a :class:`~modelseal.errors.ModelsealError`), and its memory grows with the
input. So the size is checked before anything is parsed, and the nesting depth is measured without
recursion (brackets outside strings, counted with C-speed byte operations) before ``json.loads`` runs.
The reader is also strict where ``json`` is lenient: UTF-8 only, no duplicate keys (two parsers could
otherwise read one header two ways), no ``NaN``/``Infinity``, no lone surrogates in strings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from modelseal.errors import FormatError

MAX_HEADER = 100 << 20  # the safetensors header limit; also caps every container header and document
MAX_FORMAT_DEPTH = 16  # the deepest format document (a public index inside the header) has depth 4
_CHUNK = 1 << 22
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")  # an escape or character of one


class _RejectedError(ValueError):
    """Raised from inside ``json.loads`` hooks; turned into a FormatError by :func:`loads_bounded`."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _RejectedError(f"duplicate key {dup[:60]!r}")
    return obj


def _constant(name: str) -> Any:
    raise _RejectedError(f"non-standard constant {name}")


def nesting_within(data: bytes, max_depth: int) -> bool:
    """True if no array/object in the UTF-8 JSON ``data`` is nested deeper than ``max_depth``.

    Escapes are removed first (``\\\\`` pairs, then ``\\"``), so every remaining ``"`` opens or closes a
    string; a running count of quotes tells which bytes lie inside strings. Outside strings ``[`` and
    ``{`` count +1, ``]`` and ``}`` -1: the running sum is the depth. Both sums are taken with numpy in
    fixed-size chunks, so time is linear (well under a second for 100 MB) and memory bounded. A
    negative depth (unbalanced brackets, which ``json.loads`` rejects anyway) also answers False.
    """
    import numpy as np

    step = np.zeros(256, dtype=np.int8)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    plain = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = depth = 0
    for at in range(0, len(plain), _CHUNK):
        chunk = np.frombuffer(plain, dtype=np.uint8, count=min(_CHUNK, len(plain) - at), offset=at)
        # parity only: a uint8 sum may wrap, its lowest bit stays right
        in_string = (np.cumsum(chunk == ord('"'), dtype=np.uint8) + quotes) & 1
        levels = np.cumsum(np.where(in_string, 0, step[chunk]), dtype=np.int32) + depth
        if levels.max() > max_depth or levels.min() < 0:
            return False
        quotes, depth = int(in_string[-1]), int(levels[-1])
    return True


def loads_bounded(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int = MAX_FORMAT_DEPTH, what: str
) -> Any:
    """Parse the JSON ``data`` if it is at most ``max_bytes`` long and ``max_depth`` deep.

    Every failure is a :class:`FormatError` naming ``what`` (e.g. ``"model.safetensors: the
    safetensors header"``); the message never quotes more than a short key of the input.
    """
    if len(data) > max_bytes:  # a str has at most as many characters as UTF-8 bytes: reject before copying
        raise FormatError(f"{what} is {len(data)} bytes or more, more than the limit of {max_bytes}")
    if isinstance(data, str):
        text, raw = data, data.encode("utf-8", "surrogatepass")
        if len(raw) > max_bytes:
            raise FormatError(f"{what} is {len(raw)} bytes, more than the limit of {max_bytes}")
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not UTF-8 text (file corrupt?)") from None
    if not nesting_within(raw, max_depth):
        raise FormatError(f"{what} is not valid JSON: nested more than {max_depth} levels deep, or unbalanced")
    del raw  # one copy fewer alive while json.loads builds the objects
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except _RejectedError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError):  # ValueError includes JSONDecodeError and over-long integers
        raise FormatError(f"{what} is not valid JSON (file corrupt?)") from None
    if _MAYBE_SURROGATE.search(text) and not _all_text(value):
        raise FormatError(f"{what} holds a string with a lone UTF-16 surrogate (not Unicode text)")
    return value


def _all_text(value: Any) -> bool:
    """True if every string (keys too) in ``value`` is Unicode text: ``"\\ud800"`` is valid JSON syntax
    but no character, and a name holding it cannot be encoded into a segment's AAD. Iterative."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True
