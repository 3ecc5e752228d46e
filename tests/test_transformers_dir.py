"""Hugging Face style model directories: sharded weights plus config and tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
import modelseal.transformers as mt
from modelseal.errors import AuthenticationError
from modelseal.recipients.hpke import HpkeIdentity


@pytest.fixture
def hf_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    src = tmp_path / "hf"
    src.mkdir()
    s1 = {"model.embed.weight": rng.standard_normal((50, 8)).astype(np.float32)}
    s2 = {"model.head.weight": rng.standard_normal((8, 50)).astype(np.float16)}
    save_file(s1, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(s2, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
    (src / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}))
    return src, {**s1, **s2}


def test_load_state_dict_and_config(tmp_path: Path, hf_dir: tuple[Path, dict], host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    src, tensors = hf_dir
    sealed = tmp_path / "sealed"
    res = modelseal.seal(src, sealed, [host.recipient], model_id="toy", hide_header=True)
    assert sorted(p.relative_to(sealed).as_posix() for p in sealed.rglob("*") if p.is_file()) == sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
    )
    assert {o["kind"] for o in res.outputs} == {"safetensors", "bundle"}
    state = mt.load_state_dict(sealed, identity=host, framework="np")
    assert state.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(state[k], v)
    assert mt.load_config(sealed, identity=host) == {"model_type": "toy", "hidden_size": 8}


def test_renamed_and_missing_files_are_detected(tmp_path: Path, hf_dir: tuple[Path, dict], host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    src, _ = hf_dir
    sealed = tmp_path / "sealed"
    modelseal.seal(src, sealed, [host.recipient])
    a, b = sealed / "model-00001-of-00002.safetensors", sealed / "model-00002-of-00002.safetensors"
    tmp = sealed / "x"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(AuthenticationError, match="renamed or swapped"):
        mt.load_state_dict(sealed, identity=host)
    shutil.rmtree(sealed)
    modelseal.seal(src, sealed, [host.recipient])
    (sealed / "tokenizer.json").unlink()
    with pytest.raises(AuthenticationError, match="missing"):
        mt.load_state_dict(sealed, identity=host)
