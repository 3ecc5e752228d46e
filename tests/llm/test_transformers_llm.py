"""``modelseal.transformers``: a sealed sharded LLM directory built with transformers in memory generates
what the plain one does; its tokenizer comes from the sealed files; no staged file outlives the call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import modelseal.transformers as mt
from modelseal.errors import UsageError

from .conftest import Llm


def staged() -> set[Path]:
    return set(Path("/dev/shm").glob("modelseal-*"))


def test_from_pretrained_generates_as_plain(llm: Llm) -> None:
    before = staged()
    plain = AutoModelForCausalLM.from_pretrained(str(llm.plain))
    sealed = mt.from_pretrained(AutoModelForCausalLM, llm.sealed, identity=llm.key)
    assert isinstance(sealed, LlamaForCausalLM) and len(list(llm.sealed.glob("*.safetensors"))) > 1
    tok = mt.tokenizer(llm.sealed, identity=llm.key)
    plain_tok = AutoTokenizer.from_pretrained(str(llm.plain))
    ids = tok("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    assert torch.equal(ids, plain_tok("w1 w2 w3 w4 w5", return_tensors="pt").input_ids)
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=10, do_sample=False)
        got = sealed.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(want, got)
    assert sealed.generation_config.eos_token_id == plain.generation_config.eos_token_id
    assert staged() <= before


def test_plain_directory_is_refused_unless_allowed(llm: Llm) -> None:
    with pytest.raises(UsageError, match="holds no sealed file"):
        mt.from_pretrained(LlamaForCausalLM, llm.plain, identity=llm.key)
    model = mt.from_pretrained(LlamaForCausalLM, llm.plain, allow_plain=True)
    assert model.config.num_hidden_layers == 2
