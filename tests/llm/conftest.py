"""Fixtures of the LLM engine tests: a small random Llama with its tokenizer and a LoRA adapter (made
here, nothing downloaded), its sealed copy, and the plain model's greedy output through vLLM.

These tests run in .venv-vllm (scripts/test.sh; requirements-vllm.lock says why it is separate). Each
starts real vLLM processes (about a minute each on 2 cores), so all are marked slow.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench import llms

import modelseal
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .engines import run_llm

if importlib.util.find_spec("vllm") is None:
    raise pytest.UsageError("tests/llm needs vLLM: run them with .venv-vllm/bin/python (scripts/test.sh makes it)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.slow)


@dataclass
class Llm:
    plain: Path
    lora: Path
    sealed: Path
    sealed_lora: Path
    key: Path  # the host's identity file (x25519), to which `sealed` is sealed
    identity: HpkeIdentity


@pytest.fixture(scope="session")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Llm:
    root = tmp_path_factory.mktemp("llm")
    plain = llms.llama(root / "plain")
    lora = llms.lora_adapter(root / "lora", plain)
    host = HpkeIdentity.generate(KEMS["x25519"])
    host.save(root / "host.key")
    modelseal.seal(plain, root / "sealed", [host.recipient], model_id="tiny-llama", segment_size=64 << 10)
    modelseal.seal(lora, root / "sealed-lora", [host.recipient], model_id="tiny-lora")
    return Llm(plain, lora, root / "sealed", root / "sealed-lora", root / "host.key", host)


@pytest.fixture(scope="session")
def plain_ids(llm: Llm) -> Iterator[list[list[int]]]:
    """Greedy token ids of the plain model through vLLM's default loader: what every sealed run must equal."""
    ids, proc = run_llm(llm.plain)
    assert ids is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield ids
