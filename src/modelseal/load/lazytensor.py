"""A sealed tensor that decrypts only what its consumer takes from it: the tensor-parallel loading path.

Engines shard weights as they load them: vLLM's layers call ``loaded_weight.narrow(dim, start, size)``
on each full checkpoint tensor and copy the rank's part into their parameter. Handing them a
:class:`LazySealedTensor` instead of a decrypted tensor turns that ``narrow`` plus copy into a
decryption of the segments holding the rank's part only, straight into the parameter's memory. Any
other use (``.to``, arithmetic) decrypts the part once, on first use, so semantics never change; only
narrowing and copying get cheaper. Shape, dtype, device and dimension queries need no decryption.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_map

from modelseal.format.container import Entry
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.tensors import _torch_dtype, decrypt_slice, decrypt_tensors
from modelseal.memory import arena


@dataclass
class DecryptTally:
    """Bytes decrypted against bytes the checkpoint holds: what a tensor-parallel rank saved."""

    decrypted: int = 0
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.decrypted += nbytes


_METADATA = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.__len__,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,  # type: ignore[attr-defined]
    torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    torch.Tensor.layout.__get__, torch.Tensor.is_sparse.__get__, torch.Tensor.is_quantized.__get__,  # type: ignore[attr-defined]
    torch.Tensor.is_meta.__get__, torch.Tensor.nbytes.__get__, torch.Tensor.itemsize.__get__,  # type: ignore[attr-defined]
}  # fmt: skip


class LazySealedTensor(torch.Tensor):
    """A CPU tensor holding ``entry``'s bytes ``[lo, hi)`` (default: all of it), decrypted on demand.

    ``narrow`` along the first non-trivial dimension gives another lazy tensor (a contiguous byte range);
    ``dest.copy_(lazy)`` into a contiguous CPU tensor of the same dtype and size decrypts straight into
    ``dest``, with no buffer in between: that is how vLLM's weight loaders consume it. Other narrows
    (columns) decrypt just the part into a new tensor; any other use decrypts the part once and keeps it.
    """

    _art: SealedSafetensors
    _entry: Entry
    _tally: DecryptTally
    _full: torch.Tensor | None
    _lo: int
    _hi: int

    @staticmethod
    def __new__(
        cls, art: SealedSafetensors, entry: Entry, tally: DecryptTally, part: tuple[list[int], int, int] | None = None
    ) -> LazySealedTensor:
        shape, lo, hi = part or (list(entry.info["shape"]), 0, entry.length)
        dtype = _torch_dtype(str(entry.info["dtype"]))
        made = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=torch.device("cpu"))
        made._art, made._entry, made._tally, made._full, made._lo, made._hi = art, entry, tally, None, lo, hi
        return made  # type: ignore[no-any-return]

    def __init__(self, *args: Any) -> None:
        super().__init__()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"LazySealedTensor({self._entry.name!r}, shape={list(self.shape)}, dtype={self.dtype})"

    def _whole(self) -> bool:
        return self._lo == 0 and self._hi == self._entry.length

    def materialize(self) -> torch.Tensor:
        """The tensor (or its part), decrypted once and kept for further uses of this object."""
        if self._full is None:
            if self._whole():
                self._full = decrypt_tensors(self._art, [self._entry], "pt")[self._entry.name]
            else:
                self._full = torch.empty(list(self.shape), dtype=self.dtype, device="cpu")
                self._decrypt_into(self._full)
            self._tally.add(self._hi - self._lo)
        return self._full

    def _decrypt_into(self, dest: torch.Tensor) -> None:
        view = memoryview(dest.detach().view(-1).view(torch.uint8).numpy().data)
        self._art.decrypt_ranges([(self._entry, self._lo, self._hi, view)], prepare=arena.prefault)

    def copy_into(self, dest: torch.Tensor) -> bool:
        """Decrypt straight into ``dest`` if it is a contiguous CPU tensor of this dtype and shape."""
        fits = (
            self._full is None and type(dest) is not LazySealedTensor and dest.device.type == "cpu"
            and dest.dtype == self.dtype and dest.shape == self.shape and dest.is_contiguous()
            and dest.numel() > 0
        )  # fmt: skip
        if fits:
            self._decrypt_into(dest)
            self._tally.add(self._hi - self._lo)
        return fits

    def narrow_sealed(self, dim: int, start: int, length: int) -> torch.Tensor:
        """``narrow`` decrypting only the selected part (see the class docstring)."""
        shape = list(self.shape)
        ndim = len(shape)
        if -ndim <= dim < 0:
            dim += ndim
        if 0 <= dim < ndim and -shape[dim] <= start < 0:
            start += shape[dim]
        simple = 0 <= dim < ndim and 0 <= start <= shape[dim] and 0 <= length <= shape[dim] - start
        if self._full is not None or not simple:  # anything unusual: torch's own narrow, and its errors
            return self.materialize().narrow(dim, start, length)
        itemsize = self.element_size()
        row = itemsize * math.prod(shape[dim + 1 :])
        if all(size == 1 for size in shape[:dim]):  # a range of rows: still one contiguous span, still lazy
            lo = self._lo + start * row
            part = ([*shape[:dim], length, *shape[dim + 1 :]], lo, lo + length * row)
            return LazySealedTensor(self._art, self._entry, self._tally, part)
        if not self._whole():
            return self.materialize().narrow(dim, start, length)
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        tensor, view = decrypt_slice(self._art, self._entry, index, "pt")
        self._tally.add(len(view))
        return tensor  # type: ignore[no-any-return]

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.narrow and type(args[0]) is cls and not kwargs and len(args) == 4:
            dim, start, length = (int(a) for a in args[1:])
            return args[0].narrow_sealed(dim, start, length)
        if func is torch.Tensor.copy_ and len(args) == 2 and type(args[1]) is cls and not kwargs.get("non_blocking"):
            if args[1].copy_into(args[0]):
                return args[0]
        args, kwargs = tree_map(_real, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        args, kwargs = tree_map(_real, (args, kwargs or {}))
        return func(*args, **kwargs)


def _real(value: Any) -> Any:
    return value.materialize() if isinstance(value, LazySealedTensor) else value
