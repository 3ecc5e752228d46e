"""The modelseal exception hierarchy.

Every expected failure (bad input, wrong key, tampering, missing dependency) raises a subclass of
:class:`ModelsealError` whose message says what failed, where, and what to do next. Messages never
contain key material or plaintext weights. The CLI turns these into one-line errors and exit code 1;
anything else escaping is a bug.
"""

from __future__ import annotations


class ModelsealError(Exception):
    """Base class of every error modelseal raises on purpose."""


class FormatError(ModelsealError):
    """The file is not a sealed artifact, is truncated, or its structure is malformed."""


class NotSealedError(FormatError):
    """The file is a regular file but no sealed artifact at all (a plain file): not damage, a different kind."""


class UnsupportedVersionError(FormatError):
    """The artifact was written by a newer (or unknown) format version."""


class NoMatchingIdentityError(ModelsealError):
    """None of the given identities can unwrap the artifact's data key (wrong key)."""


class AuthenticationError(ModelsealError):
    """A header, tensor or segment failed authentication: corrupt, tampered, swapped or rolled back."""


class SignatureError(ModelsealError):
    """The publisher signature is missing, invalid, or not from a trusted signer."""


class KeyFileError(ModelsealError):
    """A key, identity or recipient file or string is malformed or unreadable."""


class UsageError(ModelsealError):
    """The caller asked for something that cannot work (bad option combination, unknown tensor...)."""


class MissingDependencyError(ModelsealError):
    """An optional framework (torch, onnxruntime, ...) is needed but not installed."""


class KeyReleaseError(ModelsealError):
    """The key service or the host agent refused (or could not) release a data key.

    ``code`` is a stable machine-readable reason (``revoked``, ``expired``, ``not_granted``,
    ``agent_unavailable``, ...); the message says what to do next.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServiceError(ModelsealError):
    """A modelseal service (key service, agent) answered with an error, or could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def one_line(exc: BaseException) -> str:
    """Another library's or a plugin's exception as one line for our own message: its type and the first
    line of its text (their messages may run to pages, or carry a traceback of their own)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
