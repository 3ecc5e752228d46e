"""``modelseal.torch``: PyTorch loaders for sealed artifacts, all from memory.

* :func:`load_file`: a sealed safetensors file to ``{name: tensor}`` (drop-in for
  ``safetensors.torch.load_file``).
* :func:`load_model`: the same straight into an ``nn.Module`` with ``load_state_dict(assign=True)``,
  so the decrypted tensors become the parameters without a second copy.
* :func:`load`: a sealed ``.pt`` bundle through ``torch.load(weights_only=True)``.
* :func:`load_torchscript`: a sealed TorchScript bundle through ``torch.jit.load``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import FormatError
from modelseal.format.container import Progress
from modelseal.load.bundles import read_bytes
from modelseal.load.tensors import load_file as _load_file
from modelseal.load.tensors import require_torch
from modelseal.recipients.registry import IdentitySpec


def load_file(
    filename: str | os.PathLike[str],
    device: str = "cpu",
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Decrypt every tensor of a sealed safetensors file into torch tensors on ``device``."""
    return _load_file(filename, "pt", device, identity=identity, trusted_signers=trusted_signers, progress=progress)


def load_model(
    model: Any,
    filename: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    strict: bool = True,
    device: str = "cpu",
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """Load a sealed state dict into ``model`` (``assign=True``: no second copy). Returns the result."""
    state = load_file(filename, device, identity=identity, trusted_signers=trusted_signers)
    return model.load_state_dict(state, strict=strict, assign=True)


def _from_bytes(
    path: str | os.PathLike[str],
    name: str | None,
    identity: IdentitySpec | None,
    trusted_signers: Sequence[str] | None,
    loader: Any,
) -> Any:
    data = read_bytes(path, name, identity=identity, trusted_signers=trusted_signers)
    try:
        return loader(io.BytesIO(data))
    except Exception as exc:  # the framework raises many types for bytes it cannot parse
        raise FormatError(f"{path}: decrypted content is not loadable by PyTorch ({type(exc).__name__})") from None
    finally:
        keys.wipe(data)


def load(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    identity: IdentitySpec | None = None,
    map_location: Any = "cpu",
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """``torch.load(..., weights_only=True)`` of a checkpoint sealed as a bundle."""
    torch = require_torch()
    return _from_bytes(
        path, name, identity, trusted_signers, lambda f: torch.load(f, map_location=map_location, weights_only=True)
    )


def load_torchscript(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    identity: IdentitySpec | None = None,
    map_location: Any = "cpu",
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """``torch.jit.load`` of a TorchScript archive sealed as a bundle."""
    torch = require_torch()
    import warnings

    def jit_load(f: io.BytesIO) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(f, map_location=map_location)

    return _from_bytes(path, name, identity, trusted_signers, jit_load)
