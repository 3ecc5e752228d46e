"""Sealed LoRA adapters in vLLM: a sealed PEFT directory loads like a plain one, in memory, in the worker.

vLLM's workers read an adapter with ``PEFTHelper.from_local_dir`` (``adapter_config.json``) and
``LoRAModel.from_local_checkpoint`` (``adapter_model.safetensors`` through ``safetensors.safe_open``).
:func:`install` makes both recognise a sealed directory (``modelseal seal ./adapter``): the config is
decrypted into memory and the tensors come from the sealed file, after the directory's group check;
plain adapters take vLLM's own path unchanged. Keys come from the identity the base model was loaded
with (or ``$MODELSEAL_IDENTITY``), so a revoked key refuses new adapter loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import ModelsealError
from modelseal.jsonlimits import loads_bounded
from modelseal.load.artifacts import open_locked
from modelseal.load.hfdir import open_model_dir
from modelseal.load.tensors import decrypt_tensors
from modelseal.recipients.registry import IdentitySpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
identity: IdentitySpec | None = None
"""Set by the model loader in the worker: adapters use the base model's identity..."""
trusted_signers: Sequence[str] = ()
"""...and its trusted publishers."""


def is_sealed_adapter(directory: str) -> bool:
    """Whether either adapter file is sealed (then both must be, checked as one sealed directory)."""
    for name in (CONFIG, WEIGHTS):
        try:
            with open_locked(os.path.join(directory, name)):
                return True
        except (OSError, ModelsealError):
            continue
    return False


def sealed_config(directory: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, decrypted in memory."""
    with open_model_dir(directory, identity, trusted_signers=trusted_signers) as adapter:
        bundle = adapter.files.get(CONFIG)
        if bundle is None:
            raise ModelsealError(f"{directory}: {CONFIG} is not sealed with the adapter's weights")
        raw = bundle.read()
        try:
            config = loads_bounded(raw, max_bytes=1 << 20, max_depth=16, what=f"{directory}/{CONFIG}")
        finally:
            keys.wipe(raw)
    if not isinstance(config, dict):
        raise ModelsealError(f"{directory}/{CONFIG} is not a JSON object")
    return config


class SealedAdapterTensors:
    """What ``safetensors.safe_open`` gives vLLM for a sealed adapter: its tensors, decrypted in memory."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(path)
        with open_model_dir(directory, identity, trusted_signers=trusted_signers) as adapter:
            shard = next((s for s in adapter.shards if os.path.basename(s.path) == os.path.basename(path)), None)
            if shard is None:
                raise ModelsealError(f"{path} is not a sealed weight file of the adapter {directory}")
            self.tensors = decrypt_tensors(shard, shard.entries, "pt")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, name: str) -> Any:
        return self.tensors[name]

    def __enter__(self) -> SealedAdapterTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tensors = {}


class SealedAwareSafetensors:
    """Stands in for the ``safetensors`` module inside ``vllm.lora.lora_model``."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def safe_open(self, path: str, framework: str = "pt", device: str = "cpu") -> Any:
        if is_sealed_adapter(os.path.dirname(path)):
            return SealedAdapterTensors(path)  # the plain-config case is refused there, with the group check
        return self._real.safe_open(path, framework=framework, device=device)


def install() -> None:
    """Teach this process's vLLM LoRA loader sealed adapters (idempotent)."""
    from vllm.lora import lora_model
    from vllm.lora.peft_helper import PEFTHelper

    if isinstance(lora_model.safetensors, SealedAwareSafetensors):
        return
    lora_model.safetensors = SealedAwareSafetensors(lora_model.safetensors)  # type: ignore[assignment]
    plain = PEFTHelper.from_local_dir.__func__  # type: ignore[attr-defined]

    def from_local_dir(cls: Any, lora_path: str, max_position_embeddings: int | None, *args: Any, **kw: Any) -> Any:
        if not is_sealed_adapter(lora_path):
            return plain(cls, lora_path, max_position_embeddings, *args, **kw)
        config = sealed_config(lora_path)
        config["vllm_max_position_embeddings"] = max_position_embeddings
        return cls.from_dict(config)

    PEFTHelper.from_local_dir = classmethod(from_local_dir)  # type: ignore[method-assign,assignment]
