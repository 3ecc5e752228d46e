"""Turn command-line strings and key files into recipients and identities.

Recipient strings: ``x25519:B64``, ``mlkem768x25519:B64``, ``symmetric:PATH``, any registered scheme
(``keyserver:URL#MODEL``), or the path of a public-key or identity file.
Identity specs: an :class:`Identity` object, a list of them, identity text itself (``MODELSEAL-IDENTITY-...``
lines, as ``keygen`` writes them), a key-file path, ``env:VAR`` (the variable holds identity text),
``passphrase-env:VAR`` (the variable holds a passphrase), ``agent:SOCKET`` (keys released by the key
service through the host agent). No error message repeats a value that may be a secret.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from modelseal.errors import KeyFileError, UsageError
from modelseal.keyfile import key_lines, read_text, shown_value
from modelseal.recipients import hpke, symmetric
from modelseal.recipients.base import Identity, IdentitySet, Recipient, known_schemes, scheme
from modelseal.recipients.passphrase import Passphrase
from modelseal.release import recipient as _keyserver_recipient  # noqa: F401  (registers keyserver:)

IdentitySpec = Union[Identity, str, os.PathLike, Sequence[Union[Identity, str, os.PathLike]]]  # type: ignore[type-arg]

_LABELS = {k.label: k for k in hpke.KEMS.values()}
_SECRET_LABELS = {*_LABELS, symmetric.LABEL}


def parse_recipient(text: str) -> Recipient:
    """Parse one recipient string (see module docstring)."""
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    factory = scheme(prefix) if sep else None
    if factory is not None:
        return factory(rest)
    if os.path.isfile(text):
        return _recipient_from_file(text)
    expected = ", ".join(s + ":..." for s in known_schemes())
    raise KeyFileError(
        f"unrecognised recipient {shown_value(text)}: expected one of {expected}, "
        "or the path of a public-key or identity file"
    )


def _recipient_from_file(path: str) -> Recipient:
    text = read_text(path)
    for line in text.splitlines():
        line = line.strip().removeprefix("# recipient: ")
        prefix = line.partition(":")[0]
        if prefix in hpke.KEMS and not line.startswith("#"):
            return parse_recipient(line)
    if symmetric.LABEL in text:
        return symmetric.SymmetricKey.load(path)
    raise KeyFileError(f"{path} holds no recipient (expected a line like x25519:BASE64)")


def identities_from_text(text: str, source: str) -> list[Identity]:
    """Parse identity-file text (one or more identity lines)."""
    out: list[Identity] = []
    for label, raw in key_lines(text, source):
        if label in _LABELS:
            out.append(hpke.HpkeIdentity(_LABELS[label], raw))
        elif label == symmetric.LABEL:
            out.append(symmetric.SymmetricKey(raw))
    if not out:
        raise KeyFileError(f"{source} holds no identity (make one with `modelseal keygen`)")
    return out


def parse_identities(spec: IdentitySpec, origin: str | None = None) -> list[Identity]:
    """Resolve an identity spec to a list of identities (see module docstring).

    ``origin`` names where a string spec came from (``$MODELSEAL_IDENTITY``): errors then name the
    origin and never repeat the value, which may be a secret.
    """
    if isinstance(spec, Identity):
        return [spec]
    if isinstance(spec, (str, os.PathLike)):
        return _from_string(os.fspath(spec), origin)
    if isinstance(spec, Sequence):
        out: list[Identity] = []
        for item in spec:
            out.extend(parse_identities(item, origin))
        return out
    raise UsageError(
        f"identity must be an Identity, a key-file path, env:VAR or a list of them, not {type(spec).__name__}"
    )


def _from_string(text: str, origin: str | None) -> list[Identity]:
    if is_identity_text(text):  # the key itself, pasted into -i, identity= or $MODELSEAL_IDENTITY
        return identities_from_text(text, origin or "the identity text given")
    if text.startswith("env:"):
        var = text[4:]
        value = os.environ.get(var)
        if not value:
            raise UsageError(f"environment variable {var} is not set or empty (it should hold an identity)")
        return identities_from_text(value, f"${var}")
    if text.startswith("passphrase-env:"):
        return [Passphrase.from_env(text[len("passphrase-env:") :])]
    if text.startswith("agent:"):
        from modelseal.release.identity import AgentIdentity

        return [AgentIdentity(text[len("agent:") :])]
    shown = origin or f"identity file {shown_value(text)}"
    prefix = text.partition(":")[0]
    if prefix != text and not os.path.exists(text) and scheme(prefix) is not None:
        given = origin or shown_value(text)
        raise UsageError(f"{given} is a recipient, not an identity; pass the matching key file")
    try:
        raw = Path(text).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {shown}: {exc.strerror}") from None
    if len(raw) == 32 and not raw.isascii():
        return [symmetric.SymmetricKey(raw)]
    try:
        contents = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{shown} is not a modelseal key file (not text)") from None
    return identities_from_text(contents, shown)


def is_identity_text(text: str) -> bool:
    """Whether ``text`` is identity-file text (a ``MODELSEAL-...:BASE64`` line) rather than a spec or path."""
    return any(line.strip().partition(":")[0] in _SECRET_LABELS for line in text.splitlines())


def load_identity(spec: IdentitySpec, origin: str | None = None) -> Identity:
    """Load an identity (or several, combined) from a key file, ``env:VAR``, identity text or objects."""
    ids = parse_identities(spec, origin)
    return ids[0] if len(ids) == 1 else IdentitySet(ids)
