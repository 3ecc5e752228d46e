"""Convert a pickle-based PyTorch checkpoint (.pt/.pth/.bin) to safetensors bytes, in memory.

The checkpoint is read with ``torch.load(weights_only=True)``: no arbitrary code runs, whatever the
file contains. The result never touches the disk; it is sealed straight from memory.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any

from modelseal.errors import FormatError, MissingDependencyError


def checkpoint_to_safetensors(path: str | os.PathLike[str]) -> bytes:
    try:
        import torch
        from safetensors.torch import save
    except ImportError:
        raise MissingDependencyError(
            "converting .pt checkpoints needs PyTorch: pip install 'modelseal[torch]'"
        ) from None
    if _is_torchscript(path):
        raise FormatError(
            f"{path} is a TorchScript archive, not a checkpoint of tensors: seal it as an opaque file with "
            "--as-bundle (as_bundle=True) and load it with modelseal.torch.load_torchscript"
        )
    try:
        with warnings.catch_warnings():  # torch's own warnings would print before our one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # torch raises many types for unreadable or unsafe pickles
        raise FormatError(
            f"{path} is not a PyTorch checkpoint that loads with weights_only=True ({type(exc).__name__}); "
            "to seal it as an opaque file instead, use --as-bundle (as_bundle=True)"
        ) from None
    state = _state_dict(obj, str(path))
    seen: set[int] = set()
    tensors = {}
    for name, t in state.items():
        if t.layout != torch.strided or t.is_quantized:  # safetensors holds dense, plain tensors only
            kind = "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
            raise FormatError(
                f"{path}: tensor {name[:80]!r} is {kind}: only dense, unquantised tensors convert to safetensors; "
                "dequantise (or densify) it first, or seal the file as an opaque bundle (--as-bundle)"
            )
        t = t.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors stores no shared storage: tied weights are written twice
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    try:
        return save(tensors, metadata={"format": "pt", "converted_from": os.path.basename(path)})
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # a dtype safetensors has no name for
        raise FormatError(f"{path}: a tensor cannot be stored as safetensors ({type(exc).__name__}: {exc})") from None


def _is_torchscript(path: str | os.PathLike[str]) -> bool:
    """A ``torch.jit.save`` archive: a zip with ``constants.pkl`` and compiled ``code/`` beside the data."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _state_dict(obj: Any, source: str) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise FormatError(f"{source} holds no state dict of tensors (a module or nested object? save model.state_dict())")
