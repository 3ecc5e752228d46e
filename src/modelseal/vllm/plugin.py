"""What ``modelseal.vllm.register`` does in every vLLM process (vLLM loads general plugins in all of them).

1. Registers the ``modelseal`` load format (:mod:`modelseal.vllm.loader`).
2. Where the engine configuration is built (``vllm serve``'s front end, or the process that
   calls ``LLM(...)``): when the load format is ``modelseal`` and the model is a local sealed directory,
   its non-weight files (``config.json``, tokenizer, ...) are staged in a private RAM directory and vLLM
   is pointed there for them, while ``model_weights`` keeps the sealed directory for the loader. The
   directory is opened (and the key released) here, so a wrong key, a revoked grant, a missing shard or
   plain weights stop vLLM before any engine process starts. With keys from the host agent, a lease
   watchdog here ends vLLM, non-zero, when the key is revoked (each worker has its own, which zeroes its
   weights first).
3. Teaches the LoRA loader sealed adapters (:mod:`modelseal.vllm.lora`).
4. Where the configuration is staged, with keys from the agent: meters requests and tokens for the
   licence (:mod:`modelseal.vllm.metering`).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from vllm.logger import init_logger

from modelseal.errors import ModelsealError
from modelseal.load.hfdir import identity_for, open_model_dir, stage
from modelseal.load.leasewatch import EXIT_KEY_LOST, LeaseWatch, exit_now
from modelseal.load.memdir import MemoryDir
from modelseal.release.identity import AgentIdentity
from modelseal.vllm import lora
from modelseal.vllm.options import LOAD_FORMAT, parse_options

log = init_logger("vllm.modelseal")  # under vLLM's own log handlers and format
_staged: dict[str, MemoryDir] = {}  # sealed directory -> its staged files, alive as long as this process
_watches: dict[str, LeaseWatch] = {}


def _remove_staged() -> None:
    """Remove the staged configuration files: ``os._exit`` skips the finalizers that would."""
    for staged in _staged.values():
        staged.close()


def _stop(reason: str) -> None:
    """The key is gone: end the engine processes this one started, then this one, non-zero (the workers'
    own watchdogs zero their weights; this makes ``vllm serve`` itself exit with the reason)."""

    def children() -> None:
        import psutil

        procs = psutil.Process().children(recursive=True)
        for proc in procs:
            proc.terminate()
        _gone, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            proc.kill()
        _remove_staged()
        if "modelseal.vllm.metering" in sys.modules:  # last: the engine is gone, the counts are here
            from modelseal.vllm import metering

            metering.close_all()  # what was served since the last report

    exit_now(f"modelseal: stopping vLLM: {reason}", EXIT_KEY_LOST, children)


def _exit_if_key_refused() -> None:
    """At exit: vLLM ends itself with status 0 when a worker stops on its own watchdog, which can happen
    before this process's grace period runs out. An exit while the key is refused is that same stop, so
    it gets the same message and status 3 (and the staged files are removed, as a normal exit would)."""
    for watch in _watches.values():
        reason = watch.stopped_reason()
        if reason is not None:
            exit_now(f"modelseal: stopping vLLM: {reason}", EXIT_KEY_LOST, _remove_staged)


def stage_sealed_model(args: Any) -> None:
    """Step 2 of the module docstring, on vLLM's ``EngineArgs`` (changed in place)."""
    if args.load_format != LOAD_FORMAT or args.model_weights:
        return
    model = str(args.model)
    if not os.path.isdir(model):
        raise ModelsealError(f"--load-format {LOAD_FORMAT} needs a local sealed model directory, not {model!r}")
    opts = parse_options(args.model_loader_extra_config)
    identity = identity_for(opts.identity, opts.allow_plain)
    with open_model_dir(model, identity, trusted_signers=opts.trusted_signers, allow_plain=opts.allow_plain) as m:
        if not m.shards and not opts.allow_plain:
            raise ModelsealError(f"{model} holds no sealed weight files (*.safetensors)")
        staged = _staged.get(model) or stage(m)
        watched = m.keyserver_keys()
    _staged[model] = staged
    from modelseal.vllm import metering  # here, not at import: vLLM loads this plugin in every worker too

    if metering.plan(model, opts, identity, (key_id for key_id, _model in watched)):
        metering.install()
        args.disable_log_stats = False  # the meter counts from vLLM's statistics (LLM(...) turns them off)
    if isinstance(identity, AgentIdentity) and watched and model not in _watches:
        _watches[model] = LeaseWatch(identity.socket, watched, opts.key_check_s, opts.grace_s, _stop, log=log)
        _watches[model].start()
        if len(_watches) == 1:
            atexit.register(_exit_if_key_refused)
    log.info("modelseal: %s: configuration staged in memory at %s", model, staged.path)
    if args.tokenizer in (None, model):
        args.tokenizer = str(staged.path)
    if args.hf_config_path in (None, model):
        args.hf_config_path = None
    args.model_weights = model
    args.model = str(staged.path)
    if not getattr(args, "served_model_name", None):
        args.served_model_name = model  # clients keep addressing the model by the path they know


def _from_cli() -> bool:
    """True in ``vllm serve`` (its CLI module is loaded), False under the ``LLM(...)`` Python API."""
    return "vllm.entrypoints.cli.main" in sys.modules


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import register_model_loader

    from modelseal.vllm.loader import SealedModelLoader

    register_model_loader(LOAD_FORMAT)(SealedModelLoader)
    lora.install()
    if getattr(EngineArgs.create_engine_config, "_modelseal", False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            stage_sealed_model(self)
        except ModelsealError as exc:
            if _from_cli():
                raise SystemExit(f"modelseal: {exc}") from None  # one line and exit 1, not a traceback
            raise
        return original(self, *args, **kwargs)

    create_engine_config._modelseal = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
