"""Tensors straight out of a sealed safetensors file, mirroring the ``safetensors`` API.

Each tensor's memory is allocated once and the ciphertext is decrypted directly into it, segment by
segment, on all cores; no plaintext copy exists besides the tensor itself, and none reaches a disk.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import MissingDependencyError, UsageError
from modelseal.format.container import Entry, Progress
from modelseal.format.dtypes import DTYPES
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load import slicing
from modelseal.load.artifacts import open_artifact
from modelseal.memory import arena
from modelseal.recipients.registry import IdentitySpec

FRAMEWORKS = ("pt", "torch", "np", "numpy")


def _numpy_dtype(dtype: str) -> Any:
    import numpy as np

    known = DTYPES.get(dtype)
    if known is None or known.numpy is None:
        raise UsageError(f"dtype {dtype} has no numpy equivalent: load with framework='pt'")
    return np.dtype(known.numpy)


def _torch_dtype(dtype: str) -> Any:
    torch = require_torch()
    known = DTYPES.get(dtype)
    found = getattr(torch, known.torch, None) if known is not None and known.torch is not None else None
    if not isinstance(found, torch.dtype):
        raise UsageError(f"dtype {dtype} is not supported by this PyTorch build")
    return found


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("this needs PyTorch: pip install 'modelseal[torch]'") from None
    return torch


def _typed(raw: Any, dtype: str, shape: Sequence[int], framework: str) -> Any:
    """A flat uint8 array or tensor viewed as ``dtype`` with ``shape`` (no copy)."""
    if framework == "np":
        return raw.view(_numpy_dtype(dtype)).reshape(shape)
    return raw.view(_torch_dtype(dtype)).reshape(shape)


def _byte_view(raw: Any, framework: str) -> memoryview:
    return memoryview(raw.data) if framework == "np" else memory_of(raw)


def memory_of(tensor: Any) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, made without any torch operation.

    ``tensor.view(torch.uint8).numpy()`` costs three torch calls per tensor, and each kind of call pays
    a one-time set-up in a fresh process (about 0.3 ms in all for a small model's first load). The view
    is of a ctypes array over the tensor's memory that holds a reference to the tensor, so the memory
    outlives every view of it: a decryption worker still writing when its load has already failed
    never writes into freed memory.
    """
    nbytes = tensor.nbytes
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def allocate(entries: Sequence[Entry], framework: str, pin: bool = False) -> list[tuple[Any, memoryview]]:
    """Empty tensors (numpy or torch) for ``entries``, with a writable byte view of each.

    Each tensor has its own allocation (page-locked with ``pin``, for a CUDA copy), unless huge pages
    were asked for: then all tensors of one call share one arena (see ``arena.py``).
    """
    offsets, total = arena.layout([e.length for e in entries])
    buf = arena.allocate(total) if arena.wanted(total) and not (pin and framework == "pt") else None
    if framework == "np":
        import numpy as np

        raws = [
            np.frombuffer(buf, dtype=np.uint8, count=e.length, offset=off)
            if buf is not None and e.length
            else np.empty(e.length, np.uint8)
            for e, off in zip(entries, offsets, strict=True)
        ]
        return [_with_view(e, raw, "np") for e, raw in zip(entries, raws, strict=True)]
    torch = require_torch()
    if buf is None:  # the usual case: one allocation per tensor, already of its dtype and shape
        made = []
        for e in entries:
            if not e.length:  # an empty tensor: its shape may hold huge dimensions beside a 0 (no strides)
                made.append(_with_view(e, torch.empty(0, dtype=torch.uint8, device="cpu"), "pt"))
                continue
            t = torch.empty(e.info["shape"], dtype=_torch_dtype(e.info["dtype"]), device="cpu", pin_memory=pin)
            made.append((t, memory_of(t)))
        return made
    raws = [
        torch.frombuffer(buf, dtype=torch.uint8, count=e.length, offset=off)
        if e.length
        else torch.empty(e.length, dtype=torch.uint8, device="cpu")
        for e, off in zip(entries, offsets, strict=True)
    ]
    return [_with_view(e, raw, "pt") for e, raw in zip(entries, raws, strict=True)]


def _with_view(entry: Entry, raw: Any, framework: str) -> tuple[Any, memoryview]:
    """A flat uint8 array or tensor as ``entry``'s typed tensor, with a writable byte view of it."""
    return _typed(raw, entry.info["dtype"], entry.info["shape"], framework), _byte_view(raw, framework)


def decrypt_tensors(
    art: SealedSafetensors,
    entries: Sequence[Entry],
    framework: str,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Allocate ``entries``' tensors, decrypt into them on all cores and put them on ``device``
    (torch only; see :func:`to_device`): ``{name: tensor}``.

    The memory policy is applied here, not in the format: each worker maps a segment's destination
    pages in one system call just before it decrypts into them (``memory/arena.py``).
    """
    made = allocate(entries, framework, pin=framework == "pt" and _pinned(device))
    try:
        art.decrypt_many([(e, view) for e, (_t, view) in zip(entries, made, strict=True)], progress, arena.prefault)
    except BaseException:
        for _t, view in made:  # some segments may be decrypted already
            keys.wipe(view)
        raise
    placed = to_device(made, device) if framework == "pt" else [t for t, _v in made]
    return {e.name: t for e, t in zip(entries, placed, strict=True)}


def to_device(made: Sequence[tuple[Any, memoryview]], device: str) -> list[Any]:
    """The decrypted CPU tensors of ``made`` (tensor and byte view, as :func:`allocate` returns them)
    on ``device``, in order.

    On the CPU: the tensors themselves, no copy, nothing wiped. Elsewhere each is copied over (for
    CUDA asynchronously from pinned memory, then waited for), and the CPU buffers are wiped, also when a
    copy fails: they are plaintext the allocator would only free, and pinned memory is reused as is.
    """
    if _on_cpu(device):
        return [t for t, _v in made]
    torch = require_torch()
    cuda = torch.device(device).type == "cuda"
    moved: list[Any] = []
    try:
        moved = [t.to(device, non_blocking=cuda) for t, _v in made]
        if cuda:
            torch.cuda.synchronize(device)  # the copies have landed: the staging buffers can go
    finally:
        for i, (t, view) in enumerate(made):
            if i >= len(moved) or moved[i] is not t:  # never the tensor handed back (a CPU "move" is a no-op)
                keys.wipe(view)
    return moved


def _on_cpu(device: Any) -> bool:
    """``"cpu"``, ``"cpu:0"``, ``torch.device("cpu")``: the decrypted tensors are already where they go."""
    if device == "cpu":
        return True
    return bool(require_torch().device(device).type == "cpu")


def _pinned(device: str) -> bool:
    """Whether a load for ``device`` stages in page-locked memory (a CUDA copy from it is asynchronous)."""
    if _on_cpu(device):
        return False
    torch = require_torch()
    return bool(torch.device(device).type == "cuda" and torch.cuda.is_available())


def _empty_bytes(nbytes: int, framework: str) -> Any:
    if framework == "np":
        import numpy as np

        return np.empty(nbytes, np.uint8)
    torch = require_torch()
    return torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # "cpu" even under a default-device context


def decrypt_slice(art: SealedSafetensors, entry: Entry, index: Any, framework: str) -> tuple[Any, memoryview]:
    """``tensor[index]`` of ``entry`` on the CPU, decrypting only the segments that hold the selected
    elements (see ``slicing.py``): the tensor and a writable byte view of it (for :func:`to_device`)."""
    import numpy as np

    dtype = str(entry.info["dtype"])
    plan = slicing.plan(list(entry.info["shape"]), DTYPES[dtype].itemsize, index)
    raw = _empty_bytes(plan.nbytes, framework)
    out = _byte_view(raw, framework)
    if plan.contiguous:
        art.decrypt_ranges([(entry, plan.lo, plan.hi, out)], prepare=arena.prefault)
    else:
        scratch = bytearray(plan.hi - plan.lo)
        try:
            art.decrypt_ranges([(entry, plan.lo, plan.hi, memoryview(scratch))])
            picked = np.lib.stride_tricks.as_strided(
                np.frombuffer(scratch, np.uint8), (*plan.shape, plan.itemsize), (*plan.strides, 1), writeable=False
            )
            np.copyto(np.frombuffer(out, np.uint8).reshape((*plan.shape, plan.itemsize)), picked)
            del picked
        finally:
            keys.wipe(scratch)
    return _typed(raw, dtype, plan.shape, framework), out


class SealedSlice:
    """What ``safe_open.get_slice`` returns: shape and dtype without decrypting, and ``[index]``.

    Indexing decrypts only the segments that hold the selected elements (see ``slicing.py``), so a
    tensor-parallel rank reads and decrypts about its own shard, not the whole tensor.
    """

    def __init__(self, owner: safe_open, entry: Entry) -> None:
        self._owner = owner
        self._entry = entry

    def get_shape(self) -> list[int]:
        return list(self._entry.info["shape"])

    def get_dtype(self) -> str:
        return str(self._entry.info["dtype"])

    def __getitem__(self, index: Any) -> Any:
        tensor, view = decrypt_slice(self._owner._art, self._entry, index, self._owner._framework)
        return self._owner._place(tensor, view)


def _normalise_framework(framework: str) -> str:
    if framework not in FRAMEWORKS:
        raise UsageError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")
    return "pt" if framework in ("pt", "torch") else "np"


class safe_open:  # noqa: N801 - mirrors safetensors.safe_open
    """Open a sealed safetensors file like ``safetensors.safe_open``; tensors decrypt on access.

    ``identity`` is an identity object, a key-file path, ``env:VAR`` or ``passphrase-env:VAR`` (default:
    ``$MODELSEAL_IDENTITY``). ``trusted_signers`` (Ed25519 public keys) makes a valid publisher
    signature mandatory; it costs one SHA-256 pass over the file.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        framework: str = "pt",
        device: str = "cpu",
        *,
        identity: IdentitySpec | None = None,
        trusted_signers: Sequence[str] | None = None,
    ) -> None:
        self._framework = _normalise_framework(framework)
        self._device = device
        art = open_artifact(filename, identity, trusted_signers=trusted_signers)
        if not isinstance(art, SealedSafetensors):
            art.close()
            raise UsageError(f"{filename} is a sealed bundle, not sealed safetensors: use modelseal.open_bundle")
        self._art: SealedSafetensors = art

    def keys(self) -> list[str]:
        return [e.name for e in self._art.entries]

    def metadata(self) -> dict[str, str]:
        return self._art.metadata()

    def get_tensor(self, name: str) -> Any:
        return self.get_tensors([name])[name]

    def get_tensors(self, names: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Decrypt several tensors at once (all cores across tensors and segments)."""
        entries = self._art.entries if names is None else [self._art.entry(n) for n in names]
        return decrypt_tensors(self._art, entries, self._framework, self._device, progress)

    def get_slice(self, name: str) -> SealedSlice:
        """Like ``safetensors``' ``get_slice``: index the result to decrypt only part of a tensor."""
        return SealedSlice(self, self._art.entry(name))

    def _place(self, tensor: Any, view: memoryview) -> Any:
        """A decrypted tensor (``view``: its bytes) where this file's tensors go; see :func:`to_device`."""
        return to_device([(tensor, view)], self._device)[0] if self._framework == "pt" else tensor

    def close(self) -> None:
        self._art.close()

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_file(
    filename: str | os.PathLike[str],
    framework: str,
    device: str = "cpu",
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    with safe_open(filename, framework, device, identity=identity, trusted_signers=trusted_signers) as f:
        return f.get_tensors(progress=progress)
