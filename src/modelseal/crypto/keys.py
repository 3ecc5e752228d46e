"""The key schedule: one random data key (DEK) per artifact, purpose-bound subkeys via HKDF.

Subkeys are derived with the artifact's random 16-byte id as HKDF salt, so two artifacts that share a
DEK (the files of one sealed directory) still get independent payload keys and nonces never repeat
under one key.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEK_SIZE = 32
ARTIFACT_ID_SIZE = 16

PURPOSE_PAYLOAD = b"modelseal/1 payload"
PURPOSE_HEADER_MAC = b"modelseal/1 header-mac"
PURPOSE_INDEX = b"modelseal/1 index"


def new_dek() -> bytearray:
    """Return a fresh random 256-bit data key in a mutable buffer (so it can be wiped)."""
    return bytearray(os.urandom(DEK_SIZE))


def new_artifact_id() -> bytes:
    """Return a fresh random artifact id (HKDF salt, and the artifact's public identity)."""
    return os.urandom(ARTIFACT_ID_SIZE)


def derive(dek: bytes | bytearray, artifact_id: bytes, purpose: bytes) -> bytes:
    """Derive the 32-byte subkey for ``purpose`` from the DEK of the artifact ``artifact_id``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=artifact_id, info=purpose).derive(bytes(dek))


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer with zeros (best effort: Python may hold other copies)."""
    view = memoryview(buf).cast("B")
    view[:] = bytes(len(view))
