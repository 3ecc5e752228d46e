"""One bounded JSON reader for every document modelseal accepts from outside.

:func:`json.loads` recurses once per nesting level, so ``[[[[...]]]]`` 100,000 levels deep raises
``RecursionError`` (a bare 500 in a server, a traceback in the CLI), and it accepts documents of any
size, ``NaN``, duplicate keys (two readers could take different values: a parser differential) and lone
UTF-16 surrogates (valid JSON syntax, but no character: a tensor name holding one cannot be encoded into
a segment's AAD). :func:`loads_bounded` checks the size first, then the nesting depth with a flat scan
(no recursion, so it cannot overflow the stack), then parses strictly. Every failure is a
:class:`JSONLimitError` (a :class:`~modelseal.errors.FormatError`) whose ``code`` says which limit was
hit; messages name ``what`` was read and never quote the document. The file formats, the key service,
the agent and ``modelseal serve`` all read outside JSON through this one function.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from modelseal.errors import FormatError

_CHUNK = 1 << 22  # bytes scanned per numpy step: bounded memory whatever the document's size
_SMALL = 64 << 10  # documents up to this size have their strings dropped first (one regex pass)
_FEW = 512  # up to this many brackets are summed in Python, more by numpy
_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone, a string has no quote inside
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = (ord("["), ord("{"))
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")  # an escape or character of one
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class JSONLimitError(FormatError):
    """A JSON document is too large, nested too deep, or not strict JSON.

    ``code`` is ``too_large``, ``too_deep`` or ``malformed_json`` (stable, for HTTP error bodies)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def json_depth(data: str | bytes) -> int:
    """The deepest bracket nesting of ``data`` outside strings (exact for valid JSON).

    Escapes are removed first (``\\\\`` pairs, then ``\\"``), so every remaining ``"`` opens or closes a
    string; inside an unterminated last string nothing counts (``json.loads`` then refuses it without
    recursing). Outside strings ``[`` and ``{`` count +1, ``]`` and ``}`` -1: the running sum is the
    depth. No recursion, linear time, bounded memory, however deep the document.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _depth_of_small(plain) if len(plain) <= _SMALL else _depth_of_large(plain)


def _depth_of_small(plain: bytes) -> int:
    """For a document of a few KiB (a header, a request): strings dropped and every byte but a
    bracket deleted, in C; the few brackets left (a handful per tensor) summed in Python. numpy's
    per-call cost was most of a small load's header check."""
    if plain.count(b'"') % 2:
        plain = plain[: plain.rindex(b'"')]  # the unterminated last string
    brackets = _STRING.sub(b"", plain).translate(None, _NOT_BRACKET)
    if len(brackets) > _FEW:  # a document of brackets: numpy (no quotes are left, so no string either)
        return _depth_of_large(brackets)
    depth = deepest = 0
    for b in brackets:
        depth += 1 if b in _OPEN else -1
        deepest = max(deepest, depth)
    return deepest


def _depth_of_large(plain: bytes) -> int:
    """For a large document: the parity of the quotes so far tells which bytes lie inside strings, in
    fixed numpy chunks (one regex match per string would cost several times as much on a body of
    many short strings)."""
    quotes = depth = deepest = 0
    for at in range(0, len(plain), _CHUNK):
        chunk = np.frombuffer(plain, dtype=np.uint8, count=min(_CHUNK, len(plain) - at), offset=at)
        in_string = (np.cumsum(chunk == ord('"'), dtype=np.uint8) + quotes) & 1  # parity survives a wrap
        levels = np.cumsum(np.where(in_string, 0, _STEP[chunk]), dtype=np.int32) + depth
        deepest = max(deepest, int(levels.max()))
        quotes, depth = int(in_string[-1]), int(levels[-1])
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf: the NaN/Infinity rule through the back door
        raise ValueError(f"a number overflows to {value} (out of range for a double)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {twice[:60]!r}")
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
        value = json.loads(
            text,
            parse_constant=_no_constants,
            parse_float=_finite_float,
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
    # text decoded from UTF-8 holds no surrogate character (the codec refuses them), only escapes of one
    maybe = "\\u" in text or (isinstance(data, str) and not text.isascii())
    if maybe and _MAYBE_SURROGATE.search(text) and not _all_text(value):
        raise JSONLimitError("malformed_json", f"{what} holds a string with a lone UTF-16 surrogate (not Unicode text)")
    return value


def _all_text(value: Any) -> bool:
    """True if every string (keys too) in ``value`` encodes as UTF-8. Iterative: no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True
