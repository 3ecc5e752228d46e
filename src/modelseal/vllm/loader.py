"""The ``modelseal`` load format: vLLM's weights come straight out of sealed shards, in every worker.

Each worker (one per tensor-parallel rank) opens the sealed directory itself, gets the key from the host
agent (ranks on one host share the agent's cached key: one release per host), and feeds the model's own
``load_weights`` with :class:`~modelseal.load.lazytensor.LazySealedTensor` objects: a layer's copy into
its parameter decrypts straight into the parameter's memory, and under tensor parallelism its ``narrow``
keeps that to the rank's part. After loading, a lease watchdog stops the engine when the key is revoked (options.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from modelseal.errors import ModelsealError
from modelseal.load.hfdir import ModelDir, identity_for, is_weight_file, natural_key, open_model_dir
from modelseal.load.lazytensor import DecryptTally, LazySealedTensor
from modelseal.load.leasewatch import EXIT_KEY_LOST, LeaseWatch, exit_now
from modelseal.load.tensors import decrypt_tensors
from modelseal.release.identity import AgentIdentity
from modelseal.vllm import lora
from modelseal.vllm.options import parse_options

log = init_logger("vllm.modelseal")  # under vLLM's own log handlers and format

BATCH_BYTES = 256 << 20
"""Eager loading decrypts this much at a time (all cores across tensors), then hands it over."""


def weights_dir(model_config: ModelConfig) -> str:
    """Where the sealed shards are: the sealed directory the plugin recorded while staging the config."""
    return model_config.model_weights or model_config.model


def _eager(model: ModelDir, tally: DecryptTally) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in model.shards:
        batch: list[Any] = []
        size = 0
        for n, entry in enumerate(shard.entries):
            batch.append(entry)
            size += entry.length
            if size >= BATCH_BYTES or n == len(shard.entries) - 1:
                tensors = decrypt_tensors(shard, batch, "pt")
                tally.add(size)
                batch, size = [], 0
                yield from tensors.items()


def _lazy(model: ModelDir, tally: DecryptTally) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in model.shards:
        for entry in shard.entries:
            yield entry.name, LazySealedTensor(shard, entry, tally)


def _plain(model: ModelDir) -> Iterator[tuple[str, torch.Tensor]]:
    """Plain ``.safetensors`` shards, only where ``allow_plain`` let them through."""
    from safetensors.torch import load_file

    for rel in sorted((r for r in model.plain if r.endswith(".safetensors")), key=natural_key):
        yield from load_file(str(model.root / rel)).items()


class SealedModelLoader(BaseModelLoader):
    """``--load-format modelseal``; see the module docstring."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = parse_options(load_config.model_loader_extra_config)
        self.watch: LeaseWatch | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        if not os.path.isdir(weights_dir(model_config)):
            raise ModelsealError(f"{weights_dir(model_config)} is not a sealed model directory")

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        try:
            self._load(model, model_config)
        except ModelsealError as exc:
            log.error("modelseal: %s", exc)
            raise

    def _load(self, model: nn.Module, model_config: ModelConfig) -> None:
        opts, root = self.options, weights_dir(model_config)
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        lazy = opts.lazy if opts.lazy is not None else tp > 1  # bench/vllm_load.py: eager is faster at TP=1
        identity = identity_for(opts.identity, opts.allow_plain)
        lora.identity, lora.trusted_signers = identity, opts.trusted_signers  # for adapters loaded later here
        with open_model_dir(
            root, identity, trusted_signers=opts.trusted_signers, allow_plain=opts.allow_plain
        ) as sealed:
            if not sealed.shards and not any(is_weight_file(r) for r in sealed.plain):
                raise ModelsealError(f"{root} holds no weight files (*.safetensors)")
            tally = DecryptTally(total=sum(e.length for shard in sealed.shards for e in shard.entries))
            source = _lazy(sealed, tally) if lazy else _eager(sealed, tally)
            plain = _plain(sealed) if opts.allow_plain else iter(())
            loaded = model.load_weights(_chain(source, plain))  # type: ignore[operator]
            watched = sealed.keyserver_keys()
            shards = len(sealed.shards)
        _check_complete(model, loaded, model_config, root)
        log.info(
            "modelseal: rank %d of %d decrypted %d of %d bytes (%.1f%%) from %d sealed shards of %s",
            rank, tp, tally.decrypted, tally.total, 100 * tally.decrypted / max(tally.total, 1), shards, root,
        )  # fmt: skip
        if isinstance(identity, AgentIdentity) and watched:
            self.watch = LeaseWatch(
                identity.socket, watched, opts.key_check_s, opts.grace_s, lambda why: _stop(model, why), log=log
            )
            self.watch.start()


def _chain(*sources: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for source in sources:
        yield from source


def _check_complete(model: nn.Module, loaded: Any, model_config: ModelConfig, root: str) -> None:
    """Every parameter came from the sealed shards (vLLM's own check, for unquantized models)."""
    if loaded is None or model_config.quantization is not None:
        return
    missing = sorted({name for name, _p in model.named_parameters()} - set(loaded))
    if missing:
        raise ModelsealError(f"{root} lacks weights for {len(missing)} parameters, e.g. {', '.join(missing[:3])}")


def _stop(model: nn.Module, reason: str) -> None:
    """The key is gone: zero the weights, say why, and end the process (vLLM then shuts down)."""

    def zero() -> None:
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()

    exit_now(f"modelseal: stopping the engine: {reason}", EXIT_KEY_LOST, zero)
