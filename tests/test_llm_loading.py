"""The engine-independent parts of the LLM loaders (modelseal.vllm and modelseal.transformers use them):
model directories that are partly plain, the private RAM directory for configuration files, the lazy
tensor that decrypts only what tensor parallelism takes, the loader options and the lease watchdog."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import modelseal
from modelseal.errors import AuthenticationError, UsageError
from modelseal.load.artifacts import open_artifact
from modelseal.load.hfdir import open_model_dir, stage
from modelseal.load.lazytensor import DecryptTally, LazySealedTensor
from modelseal.load.leasewatch import LeaseWatch
from modelseal.load.memdir import MemoryDir, filesystem_type
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.vllm.options import parse_options

SEGMENT = 16 << 10


@pytest.fixture
def hf(tmp_path: Path, host: HpkeIdentity) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A two-shard model directory with config and tokenizer, and its sealed copy."""
    torch.manual_seed(0)
    src = tmp_path / "hf"
    src.mkdir()
    tensors = {"a.weight": torch.randn(64, 96), "b.weight": torch.randn(96, 64), "norm": torch.randn(64)}
    save_file({"a.weight": tensors["a.weight"]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in ("b.weight", "norm")}, str(src / "model-00002-of-00002.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    (src / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0}}))
    sealed = tmp_path / "sealed"
    modelseal.seal(src, sealed, [host.recipient], segment_size=SEGMENT)
    return src, sealed, tensors


def test_stage_puts_configuration_in_ram_and_removes_it(hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    src, sealed, _ = hf
    with open_model_dir(sealed, host) as model:
        assert [Path(s.path).name for s in model.shards] == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        ]  # fmt: skip
        staged = stage(model)
    try:
        assert filesystem_type(staged.path) in ("tmpfs", "ramfs")
        assert staged.path.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in staged.path.iterdir()) == ["config.json", "tokenizer.json"]  # no weights
        assert (staged.path / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert (staged.path / "config.json").stat().st_mode & 0o777 == 0o600
    finally:
        staged.close()
    assert not staged.path.exists()


def test_plain_files_in_a_sealed_directory_are_refused_unless_allowed(hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    src, sealed, _ = hf
    # a sealed config swapped for a plain one (say, with auto_map pointing at code) is a swap
    (sealed / "config.json").write_text(json.dumps({"model_type": "toy", "auto_map": {"AutoModel": "x.Evil"}}))
    with pytest.raises(AuthenticationError, match=r"config\.json was sealed but is now a plain file"):
        with open_model_dir(sealed, host):
            pass
    with open_model_dir(sealed, host, allow_plain=True) as model, stage(model) as staged:
        assert model.plain == ["config.json"] and (staged.path / "config.json").is_symlink()
    modelseal.seal(src, sealed, [host.recipient], force=True)
    (sealed / "x.py").write_text("print('added after sealing')")  # a file nobody sealed
    (sealed / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(UsageError, match=r"files the owner did not seal \(chat_template.jinja, x.py\)"):
        with open_model_dir(sealed, host):
            pass
    (sealed / "x.py").unlink()
    (sealed / "chat_template.jinja").unlink()
    shutil.copy(src / "model-00001-of-00002.safetensors", sealed / "model-00001-of-00002.safetensors")
    with pytest.raises(UsageError, match=r"holds plain weight files \(model-00001-of-00002.safetensors\)"):
        with open_model_dir(sealed, host):
            pass
    with open_model_dir(sealed, host, allow_plain=True) as model:
        assert len(model.shards) == 1 and "model-00001-of-00002.safetensors" in model.plain
    with pytest.raises(UsageError, match="holds no sealed file"):
        with open_model_dir(src, host):
            pass


def test_sealed_python_files_are_not_staged(tmp_path: Path, hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    src, _, _ = hf
    (src / "modeling_toy.py").write_text("class Toy: pass")
    sealed = tmp_path / "with-code"
    modelseal.seal(src, sealed, [host.recipient])
    with open_model_dir(sealed, host) as model, pytest.raises(UsageError, match="custom model code"):
        stage(model)


def test_a_swapped_shard_is_refused_before_anything_is_staged(hf: tuple, host: HpkeIdentity, tmp_path: Path) -> None:  # type: ignore[type-arg]
    src, sealed, _ = hf
    other = tmp_path / "other"
    modelseal.seal(src, other, [host.recipient])
    shutil.copy(other / "model-00002-of-00002.safetensors", sealed / "model-00002-of-00002.safetensors")
    before = set(Path("/dev/shm").glob("modelseal-*"))
    with pytest.raises(AuthenticationError, match="different sealed models"):
        with open_model_dir(sealed, host) as model:
            stage(model)
    assert set(Path("/dev/shm").glob("modelseal-*")) == before


def test_memory_dir_refuses_a_disk_and_sweeps_dead_owners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEAL_MEMDIR", str(tmp_path))
    with pytest.raises(UsageError, match=r"\$MODELSEAL_MEMDIR .* is not a RAM filesystem"):
        MemoryDir()
    monkeypatch.delenv("MODELSEAL_MEMDIR")
    dead = Path("/dev/shm") / "modelseal-999999999-leftover"  # nobody holds its lock
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    with MemoryDir() as live, MemoryDir() as fresh:
        assert not dead.exists() and live.path.exists()  # the live one (its lock is held) stays
        for bad in ("../escape", "/etc/passwd", ".", "a/../../b"):
            with pytest.raises(UsageError, match="not a path inside"):
                fresh.write(bad, b"x")
        fresh.write("sub/x.json", b"{}")
        with pytest.raises(FileExistsError):
            fresh.write("sub/x.json", b"{}")


def test_lazy_tensor_decrypts_only_the_rank_part(hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    _src, sealed, tensors = hf
    want = tensors["a.weight"]
    art = open_artifact(sealed / "model-00001-of-00002.safetensors", host)
    with art:
        tally = DecryptTally()
        lazy = LazySealedTensor(art, art.entry("a.weight"), tally)  # type: ignore[arg-type]
        assert lazy.shape == (64, 96) and lazy.dtype == torch.float32 and lazy.dim() == 2 and lazy.numel() == 64 * 96
        half = lazy.narrow(0, 32, 32)  # a rank's rows: still lazy, nothing decrypted yet
        assert type(half) is LazySealedTensor and half.shape == (32, 96) and tally.decrypted == 0
        param = torch.zeros(32, 96)
        assert param.copy_(half) is param and torch.equal(param, want[32:])  # decrypted straight into param
        assert tally.decrypted == 32 * 96 * 4  # exactly the rank's bytes
        assert torch.equal(half.narrow(0, 8, 8) * 1, want[40:48])  # a part of a part, then any other use
        cols = lazy.narrow(1, 48, 48)  # columns: decrypted (gathered) at once
        assert type(cols) is torch.Tensor and torch.equal(cols, want[:, 48:])
        whole = torch.empty(64, 96)
        whole.copy_(lazy)
        assert torch.equal(whole, want) and torch.equal(lazy + 0, want)
        with pytest.raises(RuntimeError):  # same size, other shape: copy_'s own rules (no broadcast)
            torch.empty(96, 64).copy_(LazySealedTensor(art, art.entry("a.weight"), tally))
        row = torch.empty(1, 96)
        row.copy_(lazy.narrow(0, 5, 1))  # broadcasting and dtype rules stay torch's
        assert torch.equal(row, want[5:6])
        assert torch.equal(torch.empty(64, 96, dtype=torch.float64).copy_(lazy), want.double())
        for dim, start, length in ((0, -2, 2), (-1, 0, 96), (0, 64, 0)):
            assert torch.equal(lazy.narrow(dim, start, length) * 1, want.narrow(dim, start, length))
        for dim, start, length in ((-3, 0, 1), (0, 60, 5), (0, 2, -1)):
            with pytest.raises((IndexError, RuntimeError)):
                lazy.narrow(dim, start, length)
        assert "a.weight" in repr(lazy)


def test_lazy_tensor_under_a_default_device_allocates_on_the_cpu(hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    _src, sealed, tensors = hf
    with open_artifact(sealed / "model-00002-of-00002.safetensors", host) as art, torch.device("meta"):
        lazy = LazySealedTensor(art, art.entry("norm"), DecryptTally())  # type: ignore[arg-type]
        assert torch.equal(lazy.narrow(0, 0, 64), tensors["norm"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"identiy": "x"}, r"unknown modelseal loader option\(s\) \['identiy'\]"),
        ("agent:/x", "must be a JSON object"),
        ({"identity": 3}, "'identity' must be a non-empty string"),
        ({"allow_plain": "yes"}, "'allow_plain' must be true or false"),
        ({"grace_s": -1}, "between 0 and"),
        ({"key_check_s": float("nan")}, "must be a number"),
        ({"key_check_s": True}, "must be a number"),
        ({"trusted_signers": [1]}, "list of public keys"),
    ],
)
def test_loader_options_refuse_what_they_do_not_know(raw: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_options(raw)


def test_loader_options_defaults() -> None:
    opts = parse_options({"identity": "agent:/run/a.sock", "trusted_signers": "ed25519:x", "lazy": None})
    assert (opts.identity, opts.trusted_signers) == ("agent:/run/a.sock", ("ed25519:x",))
    assert (opts.allow_plain, opts.lazy) == (False, None)
    assert parse_options(None).key_check_s == 30 and parse_options({}).grace_s == 60


def test_lease_watch_stops_only_after_the_grace_period(tmp_path: Path) -> None:
    now = [0.0]
    lost: list[str] = []
    watch = LeaseWatch(str(tmp_path / "no-agent.sock"), [("k_1", "llm")], 1, 10, lost.append, clock=lambda: now[0])
    assert watch.problem is None
    assert watch.check() is None and watch.failing_since == 0.0  # unreachable: the grace period starts
    assert watch.problem is not None and "agent_unavailable" in watch.problem and not watch.refused
    assert watch.stopped_reason() is None  # a blip of silence: a Ctrl-C now is an ordinary stop
    now[0] = 8.0
    assert watch.stopped_reason() == watch.problem  # about the grace: a worker's watchdog may have fired
    now[0] = 9.9
    assert watch.check() is None
    now[0] = 10.0
    reason = watch.check()
    assert reason is not None and "key k_1 of model 'llm'" in reason and "agent_unavailable" in reason
    assert not os.path.exists(tmp_path / "no-agent.sock")
    assert LeaseWatch("x", [], 1, 0, lost.append)._thread is None


def test_lease_watch_fails_closed_on_an_answer_without_a_key(tmp_path: Path) -> None:
    """A fake agent that says ok but sends a malformed or short key: the watchdog counts it as lost."""
    import socket
    import threading

    path = str(tmp_path / "fake.sock")
    answers = [b'{"ok": true, "key_bytes": [1]}\n', b'{"ok": true, "key_bytes": 3}\nabc', b'{"ok": true}\n']
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve() -> None:
        for answer in answers:
            conn, _ = server.accept()
            conn.recv(4096)
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    watch = LeaseWatch(path, [("k_1", "llm")], 1, 0, lambda why: None)
    for _ in answers:
        reason = watch.check()
        assert reason is not None and "k_1" in reason, reason
    server.close()


def test_transformers_state_dict_with_plain_files_allowed(hf: tuple, host: HpkeIdentity) -> None:  # type: ignore[type-arg]
    import modelseal.transformers as mt

    src, sealed, tensors = hf
    shutil.copy(src / "config.json", sealed / "config.json")
    with pytest.raises(AuthenticationError, match="swapped"):
        mt.load_state_dict(sealed, identity=host)
    state = mt.load_state_dict(sealed, identity=host, framework="np", allow_plain=True)
    assert sorted(state) == sorted(tensors)
    np.testing.assert_array_equal(state["b.weight"], tensors["b.weight"].numpy())


def test_sealed_lora_adapters_and_their_attacks(tmp_path: Path, host: HpkeIdentity, other_host: HpkeIdentity,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What vLLM's LoRA loader gets for a sealed adapter directory (modelseal.vllm.lora, without vLLM)."""
    import safetensors

    from modelseal.errors import NoMatchingIdentityError
    from modelseal.vllm import lora

    src, sealed = tmp_path / "adapter", tmp_path / "sealed"
    src.mkdir()
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (src / "adapter_config.json").write_text(json.dumps(config))
    name, tensor = "base_model.model.layers.0.q_proj.lora_A.weight", torch.randn(4, 16)
    weights = {name: tensor}
    save_file(weights, str(src / "adapter_model.safetensors"))
    modelseal.seal(src, sealed, [host.recipient])
    monkeypatch.setattr(lora, "identity", host)
    module = lora.SealedAwareSafetensors(safetensors)

    assert lora.is_sealed_adapter(str(sealed)) and not lora.is_sealed_adapter(str(src))
    assert lora.sealed_config(str(sealed)) == config
    with module.safe_open(str(sealed / "adapter_model.safetensors"), framework="pt") as f:
        assert f.keys() == [name] and torch.equal(f.get_tensor(name), tensor)
    with module.safe_open(str(src / "adapter_model.safetensors"), framework="pt") as f:  # plain: vLLM's own path
        assert list(f.keys()) == list(weights)

    # a plain config beside the sealed weights: still a sealed adapter, and the swap is refused
    shutil.copy(src / "adapter_config.json", sealed / "adapter_config.json")
    assert lora.is_sealed_adapter(str(sealed))
    with pytest.raises(AuthenticationError, match="was sealed but is now a plain file"):
        lora.sealed_config(str(sealed))
    with pytest.raises(AuthenticationError, match="was sealed but is now a plain file"):
        module.safe_open(str(sealed / "adapter_model.safetensors"))

    # an adapter sealed to another host, or no identity at all
    theirs = tmp_path / "theirs"
    modelseal.seal(src, theirs, [other_host.recipient])
    with pytest.raises(NoMatchingIdentityError):
        lora.sealed_config(str(theirs))
    monkeypatch.setattr(lora, "identity", None)
    monkeypatch.delenv("MODELSEAL_IDENTITY", raising=False)
    monkeypatch.delenv("MODELSEAL_AGENT_SOCKET", raising=False)
    with pytest.raises(UsageError, match="no identity given"):
        lora.sealed_config(str(theirs))
