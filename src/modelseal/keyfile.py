"""Text key files: one ``LABEL:base64url`` line per key, ``#`` comments allowed.

Secret key files are created with mode 0600 and never echoed; public keys are single strings of the
form ``scheme:base64url`` that can be pasted on a command line.
"""

from __future__ import annotations

import os
import re
import stat

from modelseal import atomicfile
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, KeyFileError


def key_lines(text: str, source: str) -> list[tuple[str, bytes]]:
    """Parse ``LABEL:base64url`` lines (comments and blank lines skipped) from ``text``."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, value = line.partition(":")
        if not sep:
            raise KeyFileError(f"{source}, line {number}: expected LABEL:BASE64, not a key line")
        try:
            out.append((label.strip(), b64d(value.strip(), what=f"{source}, line {number}")))
        except FormatError as exc:
            raise KeyFileError(str(exc)) from None
    if not out:
        raise KeyFileError(f"{source}: no key found")
    return out


def write_secret(
    path: str | os.PathLike[str], label: str, secret: bytes, comments: list[str], force: bool = False
) -> None:
    """Write a secret key file with mode 0600, atomically; refuse to overwrite unless ``force``."""
    text = "".join(f"# {c}\n" for c in comments) + f"{label}:{b64e(secret)}\n"
    atomicfile.write_bytes(path, text.encode(), atomicfile.PRIVATE, overwrite=force)


MAX_KEY_FILE = 1 << 16  # the largest key file (several post-quantum identities fit many times over)


def read_bytes(path: str | os.PathLike[str], shown: str | None = None) -> bytes:
    """A key file's bytes: a regular file (a FIFO named as one would hang the reader, ``/dev/zero``
    exhaust its memory) of at most :data:`MAX_KEY_FILE` bytes. ``shown``: how errors name it."""
    shown = shown or f"key file {shown_value(path)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"cannot read {shown}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError(f"{shown} is not a regular file")
        try:
            data = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read {shown}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{shown} is larger than a key file can be ({MAX_KEY_FILE} bytes)")
    return data


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a key file as text with a clear error for missing or binary files."""
    data = read_bytes(path)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{shown_value(path)} is not a modelseal key file (not text)") from None


_KEY_FILE_SUFFIXES = (".key", ".pub", ".pem", ".sign", ".id", ".identity", ".age", ".txt", ".bin")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def shown_value(value: str | os.PathLike[str]) -> str:
    """``value``, a path that failed, quoted for an error message, unless it could be a secret.

    Users paste keys and passphrases where a path belongs (``-i``, ``-r symmetric:``, identity=). Such
    a value must never reach a terminal, a log or an HTTP body, and no pattern tells a key from a path
    reliably (base64 contains ``/``, passphrases contain anything). So a value is quoted only when it
    names something that exists, or looks like a key file's name (one word ending ``.key``, ``.pem``,
    ...); otherwise the message says it was withheld.
    """
    text = os.fspath(value)
    plausible = len(text) <= 255 and not _UNSAFE.search(text) and text.lower().endswith(_KEY_FILE_SUFFIXES)
    if os.path.lexists(text) or plausible:
        return repr(text)
    return f"(a {len(text)}-character value, withheld: it names no file and may be a secret)"
