"""Which bytes of a row-major tensor a ``safetensors``-style slice needs, so only those are decrypted.

``safe_open(...).get_slice(name)[index]`` accepts what ``safetensors`` accepts: per dimension an
integer or a slice with step 1 (``None`` bounds allowed, negative values count from the end), an
optional ``...``, and fewer indices than dimensions. The plan is the smallest contiguous byte span
holding every selected element, plus the byte strides to pick them out of that span. A slice along
the first dimension (how tensor parallelism shards rows) is contiguous: its span is exactly its
bytes. Any other slice spans whole rows of the outer dimensions and is gathered out of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelseal.errors import UsageError


@dataclass(frozen=True)
class SlicePlan:
    """Where the selected elements lie: ``span`` bytes of the tensor, picked by ``shape``/``strides``."""

    shape: tuple[int, ...]  # the result's shape (integer indices drop their dimension)
    strides: tuple[int, ...]  # byte stride of each result dimension inside the span
    lo: int  # first byte of the span, relative to the tensor
    hi: int  # one past the last byte of the span
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def contiguous(self) -> bool:
        """True when the span holds exactly the result, in order (no gather needed)."""
        return self.hi - self.lo == self.nbytes


def _expand(index: Any, ndim: int) -> list[Any]:
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise UsageError("a slice may contain at most one '...'")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        items[at : at + 1] = [slice(None)] * max(0, fill)
    if len(items) > ndim:
        raise UsageError(f"too many indices: {len(items)} for a tensor with {ndim} dimensions")
    return items + [slice(None)] * (ndim - len(items))


def _bounds(item: Any, size: int, dim: int) -> tuple[int, int, bool]:
    """(start, stop, is_integer) of one index along a dimension of ``size``."""
    if isinstance(item, bool) or not isinstance(item, int | slice):
        raise UsageError(f"dimension {dim}: index must be an integer or a slice, not {type(item).__name__}")
    if isinstance(item, int):
        pos = item + size if item < 0 else item
        if not 0 <= pos < size:
            raise UsageError(f"dimension {dim}: index {item} is out of range for size {size}")
        return pos, pos + 1, True
    if item.step not in (None, 1):
        raise UsageError(f"dimension {dim}: only step 1 is supported, not {item.step}")
    for bound in (item.start, item.stop):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise UsageError(f"dimension {dim}: slice bounds must be integers")
    start, stop, _ = item.indices(size)
    return start, max(start, stop), False


def plan(shape: Sequence[int], itemsize: int, index: Any) -> SlicePlan:
    """The byte span and strides of ``tensor[index]`` for a row-major tensor of ``shape``."""
    items = _expand(index, len(shape))
    strides = [itemsize] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    bounds = [_bounds(item, size, d) for d, (item, size) in enumerate(zip(items, shape, strict=True))]
    out_shape = tuple(stop - start for start, stop, is_int in bounds if not is_int)
    out_strides = tuple(s for (_start, _stop, is_int), s in zip(bounds, strides, strict=True) if not is_int)
    if any(stop == start for start, stop, _ in bounds):
        return SlicePlan(out_shape, out_strides, 0, 0, itemsize)
    lo = sum(start * s for (start, _stop, _), s in zip(bounds, strides, strict=True))
    hi = sum((stop - 1) * s for (_start, stop, _), s in zip(bounds, strides, strict=True)) + itemsize
    return SlicePlan(out_shape, out_strides, lo, hi, itemsize)
