"""``modelseal.torch``: PyTorch loaders for sealed artifacts, all from memory.

* :func:`load_file`: a sealed safetensors file to ``{name: tensor}`` (drop-in for
  ``safetensors.torch.load_file``).
* :func:`load_model`: the same straight into an ``nn.Module`` with ``load_state_dict(assign=True)``,
  so the decrypted tensors become the parameters without a second copy.
* :func:`load`: a sealed ``.pt`` bundle through ``torch.load(weights_only=True)``.
* :func:`load_torchscript`: a sealed TorchScript bundle through ``torch.jit.load``.

What stays in memory: the decrypted archive is in our buffer, wiped after loading, and reaches PyTorch
through a reader over that buffer (:class:`_PlainReader`), never an ``io.BytesIO`` (which copies its
initial value) or a ``bytes``. ``torch.load`` reads each record into tensors it allocates: those are the
checkpoint returned. ``torch.jit.load`` reads a file object with one ``read()`` and copies the archive
into a C++ string of its own, freed (not wiped) once the module is built.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import FormatError
from modelseal.format.container import Progress
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.tensors import decrypt_tensors, require_torch
from modelseal.load.tensors import load_file as _load_file
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
    return _assign(model, load_file(filename, device, identity=identity, trusted_signers=trusted_signers), strict)


def load_model_from(model: Any, artifact: SealedSafetensors, *, strict: bool = True, device: str = "cpu") -> Any:
    """:func:`load_model` from a sealed safetensors file that is already open and unlocked (a server
    opens a model's file once for all its instances). On the CPU each tensor is decrypted straight into
    its own allocation, which becomes the parameter (``assign=True``); for another device it is decrypted
    into a (pinned) CPU buffer, copied over, and that buffer is wiped (``load.tensors.to_device``)."""
    return _assign(model, decrypt_tensors(artifact, artifact.entries, "pt", device), strict)


def _assign(model: Any, state: dict[str, Any], strict: bool) -> Any:
    """``model.load_state_dict(state, assign=True)``; when the module refuses it, every tensor of the state
    is zeroed (with ``assign=True`` some may already be its parameters, and nobody else can wipe them)."""
    torch = require_torch()
    try:
        return model.load_state_dict(state, strict=strict, assign=True)
    except BaseException:
        with torch.no_grad():
            for tensor in state.values():
                tensor.zero_()
        raise


class _PlainReader(io.RawIOBase):
    """A read-only, seekable file over a buffer of decrypted bytes, without copying it: ``readinto``
    fills the caller's memory (``torch.load`` reads each record so), and ``read()`` of the whole buffer
    from the start returns the buffer itself (``torch.jit.load`` passes it on to C++ as it is)."""

    def __init__(self, data: bytearray) -> None:
        super().__init__()
        self._data = data
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        target = memoryview(out).cast("B")
        n = max(0, min(len(target), len(self._view) - self._pos))
        target[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> Any:
        if (size is None or size < 0) and self._pos == 0:
            self._pos = len(self._view)
            return self._data
        return super().read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()


def _loaded(data: bytearray, source: str, loader: Any) -> Any:
    """``loader`` applied to a reader over ``data``; a failure to parse is one clear error."""
    reader = _PlainReader(data)
    try:
        return loader(reader)
    except Exception as exc:  # the framework raises many types for bytes it cannot parse
        raise FormatError(f"{source}: decrypted content is not loadable by PyTorch ({type(exc).__name__})") from None
    finally:
        reader.close()


def _from_bytes(
    path: str | os.PathLike[str],
    name: str | None,
    identity: IdentitySpec | None,
    trusted_signers: Sequence[str] | None,
    loader: Any,
) -> Any:
    from modelseal.load.bundles import read_bytes  # bundles only: a safetensors load does not import it

    data = read_bytes(path, name, identity=identity, trusted_signers=trusted_signers)
    try:
        return _loaded(data, str(path), loader)
    finally:
        keys.wipe(data)


def _jit_loader(map_location: Any) -> Any:
    torch = require_torch()
    import warnings

    def jit_load(f: io.RawIOBase) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(f, map_location=map_location)

    return jit_load


def jit_load_buffer(data: bytearray, *, map_location: Any = "cpu", source: str = "the model") -> Any:
    """``torch.jit.load`` of a decrypted TorchScript archive in ``data`` (which the caller wipes)."""
    return _loaded(data, source, _jit_loader(map_location))


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
    return _from_bytes(path, name, identity, trusted_signers, _jit_loader(map_location))
