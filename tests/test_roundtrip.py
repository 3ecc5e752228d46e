"""Round trips through real frameworks: what goes in comes out bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import modelseal
import modelseal.numpy
import modelseal.torch
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from tests.conftest import make_tensors

ALL_TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex64,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(
        0, 256, (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=gen
    )
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("hidden", [False, True])
def test_every_safetensors_dtype_round_trips_bit_exact(
    tmp_path: Path, host: HpkeIdentity, host_key: Path, hidden: bool
) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t_{str(d).split('.')[-1]}": random_tensor(d, (3, 5, 7), gen) for d in ALL_TORCH_DTYPES}
    tensors["big"] = random_tensor(torch.float32, (70_000,), gen)  # spans several 64 KiB segments
    tensors["zero_size"] = torch.empty((0, 3), dtype=torch.bfloat16)
    plain = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(plain))
    sealed = tmp_path / "m.sealed.safetensors"
    modelseal.seal(plain, sealed, [host.recipient], hide_header=hidden, segment_size=64 << 10)
    loaded = modelseal.torch.load_file(sealed, identity=host_key)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert bits(loaded[name]) == bits(t), name


def test_sealed_file_stays_parseable_by_safetensors(tmp_path: Path, plain_file: Path, host: HpkeIdentity) -> None:
    sealed = tmp_path / "s.safetensors"
    modelseal.seal(plain_file, sealed, [host.recipient])
    with safetensors.safe_open(str(sealed), "np") as f:
        names = set(f.keys())
        assert set(make_tensors()) | {"__modelseal_tags__"} == names
        assert f.get_tensor("embed.weight").shape == (300, 64)
        # same offsets, different bytes: the tensor is there, encrypted in place
        assert not np.array_equal(f.get_tensor("embed.weight"), make_tensors()["embed.weight"])


def test_hidden_header_exposes_no_names(tmp_path: Path, plain_file: Path, host: HpkeIdentity, host_key: Path) -> None:
    sealed = tmp_path / "h.safetensors"
    modelseal.seal(plain_file, sealed, [host.recipient], hide_header=True)
    raw = sealed.read_bytes()
    assert b"embed.weight" not in raw and b"author" not in raw
    with safetensors.safe_open(str(sealed), "np") as f:
        assert set(f.keys()) == {"__modelseal_payload__", "__modelseal_tags__"}
    with modelseal.safe_open(sealed, "np", identity=host_key) as f:
        assert set(f.keys()) == set(make_tensors())
        assert f.metadata() == {"format": "np", "author": "tests"}


@pytest.mark.parametrize("kind", ["x25519", "mlkem768x25519", "symmetric", "passphrase"])
def test_each_recipient_kind(tmp_path: Path, plain_file: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kind in KEMS:
        ident = HpkeIdentity.generate(KEMS[kind])
        keyfile = tmp_path / "id.key"
        ident.save(keyfile)
        recipient: object = ident.recipient.describe()
        identity: object = keyfile
    elif kind == "symmetric":
        keyfile = tmp_path / "sym.key"
        modelseal.SymmetricKey.generate().save(keyfile)
        recipient, identity = f"symmetric:{keyfile}", keyfile
    else:
        monkeypatch.setenv("PW", "correct horse battery staple")
        recipient = modelseal.Passphrase("correct horse battery staple", log_n=12)
        identity = "passphrase-env:PW"
    sealed = tmp_path / "s.safetensors"
    modelseal.seal(plain_file, sealed, [recipient])  # type: ignore[list-item]
    out = modelseal.numpy.load_file(sealed, identity=identity)  # type: ignore[arg-type]
    for name, arr in make_tensors().items():
        np.testing.assert_array_equal(out[name], arr)


def test_several_recipients_each_open(tmp_path: Path, plain_file: Path) -> None:
    ids = [HpkeIdentity.generate(KEMS["x25519"]), HpkeIdentity.generate(KEMS["mlkem768x25519"])]
    sealed = tmp_path / "s.safetensors"
    modelseal.seal(plain_file, sealed, [i.recipient for i in ids])
    for ident in ids:
        out = modelseal.numpy.load_file(sealed, identity=ident)
        np.testing.assert_array_equal(out["counts"], make_tensors()["counts"])


def test_single_tensor_random_access(tmp_path: Path, plain_file: Path, host: HpkeIdentity) -> None:
    sealed = tmp_path / "s.safetensors"
    modelseal.seal(plain_file, sealed, [host.recipient])
    with modelseal.safe_open(sealed, "pt", identity=host) as f:
        t = f.get_tensor("layer.0.bias")
    assert t.dtype == torch.float64
    np.testing.assert_array_equal(t.numpy(), make_tensors()["layer.0.bias"])


def test_identity_from_env(
    tmp_path: Path, plain_file: Path, host: HpkeIdentity, host_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = tmp_path / "s.safetensors"
    modelseal.seal(plain_file, sealed, [host.recipient])
    monkeypatch.setenv("HOSTKEY", host_key.read_text())
    assert "mask" in modelseal.numpy.load_file(sealed, identity="env:HOSTKEY")
    monkeypatch.setenv("MODELSEAL_IDENTITY", str(host_key))
    assert "mask" in modelseal.numpy.load_file(sealed)


def test_pt_checkpoint_is_converted_in_memory(tmp_path: Path, host: HpkeIdentity) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    sealed = tmp_path / "model.sealed.safetensors"
    res = modelseal.seal(ckpt, sealed, [host.recipient])
    assert res.outputs[0]["kind"] == "safetensors"
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    modelseal.torch.load_model(fresh, sealed, identity=host)
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_pickle_with_code_is_refused(tmp_path: Path, host: HpkeIdentity) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple:  # type: ignore[type-arg]
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(modelseal.FormatError, match="weights_only"):
        modelseal.seal(bad, tmp_path / "out.safetensors", [host.recipient])
    assert not (tmp_path / "out.safetensors").exists()


def test_torch_load_model_assigns_without_copy(tmp_path: Path, host: HpkeIdentity) -> None:
    model = torch.nn.Linear(16, 16)
    plain = tmp_path / "lin.safetensors"
    safetensors.torch.save_model(model, str(plain))
    sealed2 = tmp_path / "lin.sealed.safetensors"
    modelseal.seal(plain, sealed2, [host.recipient])
    target = torch.nn.Linear(16, 16)
    modelseal.torch.load_model(target, sealed2, identity=host)
    assert torch.equal(target.weight, model.weight)


def test_a_trusted_signer_given_as_the_public_files_text_is_read(tmp_path: Path) -> None:
    """``--trusted-signer "$(cat publisher.pub)"``: the file's comment line came along and was refused."""
    from click.testing import CliRunner

    from modelseal.cli.main import main
    from modelseal.crypto.signing import Signer, parse_public, public_string

    assert CliRunner().invoke(main, ["keygen", "--signing", "-o", str(tmp_path / "pub.sign")]).exit_code == 0
    signer = Signer.load(tmp_path / "pub.sign")
    text = (tmp_path / "pub.pub").read_text()  # as keygen writes it
    assert text.lstrip().startswith("#")  # the case: a comment line before the key
    assert public_string(parse_public(text)) == signer.public
    assert public_string(parse_public(str(tmp_path / "pub.pub"))) == signer.public
