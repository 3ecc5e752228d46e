"""Small Hugging Face LLM directories made on the spot (nothing downloaded), for the LLM tests and
bench/vllm_load.py: a Llama with random weights, a word-level tokenizer, and a LoRA adapter for it.

vLLM's CPU attention wants a head size of 32 or more (16 is refused) and float32 weights (bfloat16
crashed its CPU worker in a trial here); the defaults respect both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = [f"w{i}" for i in range(240)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def tokenizer(directory: Path) -> None:
    """A word-level fast tokenizer over ``WORDS`` (ids 4..), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(directory))


def llama(
    directory: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    seed: int = 0,
    shard_size: str = "300KB",
) -> Path:
    """A random-weight Llama saved as a sharded safetensors checkpoint (index file included) with its
    config, generation config and tokenizer; float32. Returns ``directory``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # random init is tiny; scale up so greedy choices are well separated
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), max_shard_size=shard_size, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(str(directory))
    tokenizer(directory)
    return directory


def lora_adapter(directory: Path, base: Path, *, rank: int = 8, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for the Llama at ``base`` (q/k/v/o projections), random non-zero B so that it
    changes the output, written as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    out = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for layer in range(layers):
        for proj, width in out.items():
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.2
            tensors[f"{stem}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.2
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    adapter = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank * 2,
        "target_modules": list(out), "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(adapter, indent=1))
    return directory


PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w200 w5 w7 w9 w11"]
