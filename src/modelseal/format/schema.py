"""Small typed checks for the fields of the format's JSON documents.

Every document the format reads (safetensors listing, envelope, protected header, index, recipient
stanzas, bundle manifest, directory group) is checked field by field with these before any code uses
it, and again after authentication (a key holder, or the owner's own buggy tool, can MAC anything).
A failed check is a :class:`FormatError` that names the file and the field, never a ``TypeError``
or ``AttributeError`` from deep inside a loader.
"""

from __future__ import annotations

from typing import Any

from modelseal.errors import FormatError
from modelseal.jsonlimits import loads_bounded

MAX_INT = (1 << 63) - 1  # offsets and sizes are u64 in the container; Python ints are not bounded
MAX_HEADER = 100 << 20  # the safetensors header limit; also caps every container header and document
MAX_DEPTH = 16  # the deepest format document (a public index inside the header) has depth 4


def document(data: bytes | bytearray | memoryview | str, what: str) -> Any:
    """A JSON document of the format, read within the format's size and depth limits."""
    return loads_bounded(data, max_bytes=MAX_HEADER, max_depth=MAX_DEPTH, what=what)


def obj(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object."""
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be a JSON object, not {_kind(value)}")
    return value


def array(value: Any, what: str) -> list[Any]:
    """``value`` if it is a JSON array."""
    if not isinstance(value, list):
        raise FormatError(f"{what} must be a JSON array, not {_kind(value)}")
    return value


def string(value: Any, what: str, *, max_len: int = 4096, min_len: int = 0) -> str:
    """``value`` if it is a string of ``min_len`` to ``max_len`` characters."""
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a string, not {_kind(value)}")
    if not min_len <= len(value) <= max_len:
        raise FormatError(f"{what} must be {min_len} to {max_len} characters long, not {len(value)}")
    return value


def integer(value: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` if it is an integer (not a boolean, not a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{what} must be an integer, not {_kind(value)}")
    if not lo <= value <= hi:
        raise FormatError(f"{what} must be between {lo} and {hi}")
    return value


def strings(value: Any, what: str, *, max_len: int = 4096) -> list[str]:
    """``value`` if it is an array of strings."""
    items = array(value, what)
    for i, item in enumerate(items):
        string(item, f"{what}[{i}]", max_len=max_len)
    return items


def string_map(value: Any, what: str) -> dict[str, str]:
    """``value`` if it is an object whose values are all strings (safetensors ``__metadata__``)."""
    mapping = obj(value, what)
    for k, v in mapping.items():
        if not isinstance(v, str):
            raise FormatError(f"{what} must map strings to strings; {k[:60]!r} holds {_kind(v)}")
    return mapping


def offsets(value: Any, what: str) -> tuple[int, int]:
    """``value`` if it is ``[begin, end]`` with ``0 <= begin <= end``."""
    pair = array(value, what)
    if len(pair) != 2:
        raise FormatError(f"{what} must be [begin, end], not {len(pair)} values")
    begin, end = integer(pair[0], f"{what} begin"), integer(pair[1], f"{what} end")
    if end < begin:
        raise FormatError(f"{what} ends before it begins")
    return begin, end


def relpath(value: Any, what: str) -> str:
    """``value`` if it is a relative POSIX path that stays inside its root: no ``/`` prefix, no empty,
    ``.`` or ``..`` part, no NUL (bundle names and directory members become paths when opened)."""
    name = string(value, what, min_len=1)
    if name.startswith("/") or "\x00" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise FormatError(f"{what}: unsafe path {name[:80]!r}")
    return name


def _kind(value: Any) -> str:
    """The JSON type name of ``value``, for messages (never the value: it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )
