"""The safetensors dtypes modelseal knows: one table, read by the format checks and by every loader.

A sealed tensor's byte length must equal its element count times :attr:`DType.itemsize` (the format
refuses anything else, so no loader ever reinterprets bytes it was not given). The loaders view the
decrypted bytes as the framework dtype named here. The names are plain strings so that this module
imports neither numpy nor torch; ``None`` means the framework has no such type, and a torch name a
given PyTorch build lacks (``uint16`` before 2.3, the float8 types) is reported by the loader.

(The KServe V2 datatypes of ``serve/datatypes.py`` are the inference protocol's own table, not this.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in headers, bytes per element, and its numpy and torch names."""

    name: str
    itemsize: int
    numpy: str | None  # numpy dtype name; None: numpy has no equivalent (bfloat16, float8)
    torch: str | None  # attribute of the ``torch`` module


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, "bool", "bool"),
        DType("U8", 1, "uint8", "uint8"),
        DType("I8", 1, "int8", "int8"),
        DType("F8_E5M2", 1, None, "float8_e5m2"),
        DType("F8_E4M3", 1, None, "float8_e4m3fn"),
        DType("F8_E4M3FNUZ", 1, None, "float8_e4m3fnuz"),
        DType("F8_E5M2FNUZ", 1, None, "float8_e5m2fnuz"),
        DType("F8_E8M0", 1, None, "float8_e8m0fnu"),
        DType("I16", 2, "int16", "int16"),
        DType("U16", 2, "uint16", "uint16"),
        DType("F16", 2, "float16", "float16"),
        DType("BF16", 2, None, "bfloat16"),
        DType("I32", 4, "int32", "int32"),
        DType("U32", 4, "uint32", "uint32"),
        DType("F32", 4, "float32", "float32"),
        DType("C64", 8, "complex64", "complex64"),
        DType("F64", 8, "float64", "float64"),
        DType("I64", 8, "int64", "int64"),
        DType("U64", 8, "uint64", "uint64"),
    )
}


def lookup(name: object) -> DType | None:
    """The dtype called ``name`` in a header, or None for anything else (including non-strings)."""
    return DTYPES.get(name) if isinstance(name, str) else None
