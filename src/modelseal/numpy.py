"""``modelseal.numpy``: like ``safetensors.numpy``, for sealed files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from modelseal.load.tensors import load_file as _load_file
from modelseal.recipients.registry import IdentitySpec


def load_file(
    filename: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Decrypt every tensor of a sealed safetensors file into numpy arrays."""
    return _load_file(filename, "np", identity=identity, trusted_signers=trusted_signers)
