"""``modelseal.vllm``: sealed models in vLLM (``pip install 'modelseal[vllm]'``).

vLLM finds this plugin through its ``vllm.general_plugins`` entry point and calls :func:`register` in
every process it starts. Then::

    vllm serve ./sealed-llm --load-format modelseal \\
        --model-loader-extra-config '{"identity": "agent:/run/modelseal/agent.sock"}'

or ``LLM(model="./sealed-llm", load_format="modelseal", model_loader_extra_config={...})`` load the
sealed shards straight into vLLM's parameters. docs/llm.md has the whole story; the loader options are
in :mod:`modelseal.vllm.options`.
"""

from __future__ import annotations


def register() -> None:
    """vLLM's plugin hook (idempotent: vLLM may call it more than once per process)."""
    from modelseal.vllm import plugin

    plugin.install()
