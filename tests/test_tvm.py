"""Sealed TVM models (``modelseal.tvm``, ``platform: "tvm"``): a tiny Relax model compiled for llvm, sealed,
loaded from memory only (params into TVM arrays, the compiled library from an anonymous memory file),
answering exactly like plain TVM, served with `modelseal serve`, and refusing damaged or hostile input
with one clear error each."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tvm")

import modelseal
import modelseal.tvm
from modelseal.errors import AuthenticationError, FormatError, NoMatchingIdentityError
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .tvm_models import TinyTvm, add_tvm_model, build_tiny
from .write_audit import WRITE_AUDIT_HOOK


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model exported, sealed as a directory for one identity, and the key file."""
    tmp = tmp_path_factory.mktemp("tvm")
    identity = HpkeIdentity.generate(KEMS["x25519"])
    identity.save(tmp / "host.key")
    model = build_tiny(tmp / "export")
    modelseal.seal(model.export_dir, tmp / "sealed", [identity.recipient])
    return {"tmp": tmp, "model": model, "identity": identity, "key": tmp / "host.key", "sealed": tmp / "sealed"}


def _mapped(name: str) -> bool:
    with open("/proc/self/maps", "rb") as maps:
        return f"/memfd:{name} ".encode() in maps.read()


def test_sealed_directory_answers_like_plain_tvm(tiny: dict[str, Any]) -> None:
    model: TinyTvm = tiny["model"]
    expected = model.reference(model.batch)
    np.testing.assert_allclose(expected, np.maximum(model.batch @ model.params["w"] + model.params["b"], 0), rtol=1e-5)
    with modelseal.tvm.load(tiny["sealed"], identity=tiny["key"]) as sealed:
        assert [(t.name, t.datatype, t.shape) for t in sealed.metadata.inputs] == [("x", "FP32", (None, 4))]
        assert sealed.metadata.params == ("w", "b")
        out = sealed.run({"x": model.batch})
        assert list(out) == ["y"]
        np.testing.assert_array_equal(out["y"], expected)
        np.testing.assert_array_equal(sealed({"x": model.batch[:1]})["y"], expected[:1])  # another batch size
        library = sealed._library
        assert library is not None and _mapped(library.name)  # code runs from our memory file
        views = list(sealed._views)
        assert any(v.any() for v in views)
    assert all(not v.any() for v in views), "close() zeroes every params array"
    assert not _mapped(library.name) and library.fd is None  # unloaded, then zeroed and closed
    with modelseal.tvm.load(model.export_dir) as plain:  # the unsealed export loads too
        np.testing.assert_array_equal(plain.run({"x": model.batch})["y"], expected)


def test_sealed_bundle_of_the_export_directory(tiny: dict[str, Any]) -> None:
    from modelseal.crypto.keys import new_dek
    from modelseal.format import bundle

    out = tiny["tmp"] / "model.tvm.msb"
    builder = bundle.new_builder("tiny", "1", new_dek(), 8192)
    bundle.seal_path(tiny["model"].export_dir, out, [tiny["identity"].recipient], builder=builder)
    with modelseal.tvm.load(out, identity=tiny["key"]) as sealed:
        np.testing.assert_array_equal(sealed.run({"x": tiny["model"].batch})["y"],
                                      tiny["model"].reference(tiny["model"].batch))  # fmt: skip


def test_sealed_layout_holds_no_plaintext(tiny: dict[str, Any]) -> None:
    from modelseal.format.bundle import is_bundle

    sealed: Path = tiny["sealed"]
    assert sorted(p.name for p in sealed.iterdir()) == ["metadata.json", "model.so", "params.safetensors"]
    assert is_bundle(sealed / "model.so") and is_bundle(sealed / "metadata.json")
    weights = tiny["model"].params["w"].tobytes()
    code = (tiny["model"].export_dir / "model.so").read_bytes()
    for member in sealed.iterdir():
        data = member.read_bytes()
        assert weights not in data and code[4096:4160] not in data


def test_runtime_declares_from_metadata_and_checks_config(tiny: dict[str, Any]) -> None:
    from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
    from modelseal.serve.runtimes.base import registry
    from modelseal.serve.runtimes.tvm import TvmRuntime
    from modelseal.serve.source import open_source

    assert registry().platform_of("", "tvm") == "tvm"
    empty = ModelSpec("tiny", tiny["tmp"], "tvm", 8, (), ())  # a config that leaves the tensors out
    with open_source(tiny["sealed"], lambda: tiny["identity"]) as source:
        runtime = TvmRuntime(empty, source, 0)
    try:
        assert runtime.declared() == ({"x": ("FP32", (None, 4))}, {"y": ("FP32", (None, 3))})
        good = ModelSpec("tiny", tiny["tmp"], "tvm", 8, (TensorSpec("x", "FP32", (4,)),),
                         (TensorSpec("y", "FP32", (3,)),))  # fmt: skip
        runtime.check(good)
        bad = ModelSpec("tiny", tiny["tmp"], "tvm", 8, (TensorSpec("x", "FP64", (5,)),),
                        (TensorSpec("y", "FP32", (3,)),))  # fmt: skip
        with pytest.raises(ConfigError, match="'x' is FP64 in the config but FP32 in the model"):
            runtime.check(bad)
        out = runtime.run({"x": tiny["model"].batch}, ["y"])
        np.testing.assert_array_equal(out["y"], tiny["model"].reference(tiny["model"].batch))
        # the second review: a config saying -1 where the model is fixed let a wrong shape reach TVM (a 500
        # and a traceback); it is a bad request
        from modelseal.serve.errors import ServeError

        with pytest.raises(ServeError, match=r"input x has shape \[2, 5\]; the TVM model takes \[-1, 4\]") as caught:
            runtime.run({"x": np.zeros((2, 5), np.float32)}, ["y"])
        assert caught.value.status == 400
    finally:
        runtime.close()
    runtime.close()  # twice is harmless


PROBE = (
    textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # tvm_ffi imports PyTorch if it can (seconds); the load never uses it
        import modelseal.serve.runtimes.tvm  # the runtime module imports no framework
        assert "tvm" not in sys.modules, "importing the TVM runtime imported tvm"
        import tvm, tvm.relax, numpy  # frameworks first: first imports may write caches
        import modelseal, modelseal.tvm
        """
    )
    + WRITE_AUDIT_HOOK
    + textwrap.dedent(
        """
        import json
        sealed, key, batch = sys.argv[1], sys.argv[2], numpy.ones((2, 4), numpy.float32)
        with modelseal.tvm.load(sealed, identity=key) as m:
            y = m.run({"x": batch})["y"]
        print(json.dumps({"writes": writes, "y": y.tolist()}))
        """
    )
)


def test_sealed_load_opens_nothing_for_writing(tiny: dict[str, Any]) -> None:
    """In a fresh interpreter with an audit hook: the sealed load, compiled library included, opens no
    file for writing (the memory file is no file on a disk, and is not opened by path)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tiny["sealed"]), str(tiny["key"])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["writes"] == [], report["writes"]
    expected = tiny["model"].reference(np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(np.array(report["y"], np.float32), expected)


# ------------------------------------------------------------------------------------------ attacks


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("member", ["model.so", "params.safetensors", "metadata.json"])
def test_tampered_member_is_refused(tiny: dict[str, Any], member: str, tmp_path: Path) -> None:
    import shutil

    sealed = tmp_path / "sealed"
    shutil.copytree(tiny["sealed"], sealed)
    _flip(sealed / member, (sealed / member).stat().st_size - 20)  # inside the last ciphertext segment
    with pytest.raises(AuthenticationError):
        modelseal.tvm.load(sealed, identity=tiny["key"])


def test_wrong_key_is_refused(tiny: dict[str, Any]) -> None:
    other = HpkeIdentity.generate(KEMS["x25519"])
    with pytest.raises(NoMatchingIdentityError):
        modelseal.tvm.load(tiny["sealed"], identity=other)


def _good_metadata() -> dict[str, Any]:
    return {"format": "modelseal-tvm", "version": 1, "function": "main",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}], "params": ["w", "b"]}  # fmt: skip


HOSTILE = {
    "not an object": ([1, 2], "must be a JSON object"),
    "wrong format": ({**_good_metadata(), "format": "x"}, "not a modelseal-tvm version 1"),
    "unknown field": ({**_good_metadata(), "exec": "rm"}, "unknown field"),
    "inputs not a list": ({**_good_metadata(), "inputs": {"x": 1}}, "inputs must be a JSON array"),
    "missing outputs": ({k: v for k, v in _good_metadata().items() if k != "outputs"}, "outputs must be a JSON array"),
    "name not a string": ({**_good_metadata(), "inputs": [{"name": 7, "datatype": "FP32", "shape": [4]}]},
                          r"inputs\[0\].name must be a string"),
    "missing shape": ({**_good_metadata(), "inputs": [{"name": "x", "datatype": "FP32"}]},
                      "shape must be a JSON array"),
    "bad datatype": ({**_good_metadata(), "inputs": [{"name": "x", "datatype": "STRING", "shape": [4]}]},
                     "is not one of"),
    "float dim": ({**_good_metadata(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [4.0]}]},
                  "must be an integer"),
    "huge dim": ({**_good_metadata(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 40]}]},
                 "must be between -1 and"),
    "too many dims": ({**_good_metadata(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 65}]},
                      "more than 64"),
    "duplicate names": ({**_good_metadata(), "params": ["x", "b"]}, "appears twice"),
    "bad function": ({**_good_metadata(), "function": "../x"}, "is not a function name"),
    "huge document": ({**_good_metadata(), "params": ["p" * 200] * 6000}, "over the limit"),
    "too many params": ({**_good_metadata(), "params": [f"p{i}" for i in range(70_000)]}, "over the limit"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata_is_one_clear_error(case: str) -> None:
    doc, message = HOSTILE[case]
    with pytest.raises(FormatError, match=message) as info:
        modelseal.tvm.parse_metadata(json.dumps(doc).encode(), "m")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_hostile_metadata_in_a_sealed_model(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: sealed with metadata whose params do not match the params file, and with a wrong
    arity, and with garbage JSON: each load is one FormatError, and no memory file is left behind. A load
    that fails after the library was mapped still zeroes it (the review found the failed call's frames
    kept TVM's executable alive, so the decrypted code was closed unzeroed)."""
    import shutil

    zeroed: list[bool] = []
    release = modelseal.tvm._MemoryLibrary.release

    def spy(library: Any) -> bool:
        zeroed.append(release(library))
        return zeroed[-1]

    monkeypatch.setattr(modelseal.tvm._MemoryLibrary, "release", spy)

    cases = {
        "params": ({**_good_metadata(), "params": ["w"]}, "does not match metadata.json's params"),
        "arity": ({**_good_metadata(), "inputs": [], "params": ["w", "b"]}, "takes 3 arguments"),
        "garbage": (None, "not valid JSON"),
    }
    for name, (doc, message) in cases.items():
        export = tmp_path / f"export-{name}"
        shutil.copytree(tiny["model"].export_dir, export)
        (export / "metadata.json").write_bytes(b"{nope" if doc is None else json.dumps(doc).encode())
        modelseal.seal(export, tmp_path / f"sealed-{name}", [tiny["identity"].recipient])
        with pytest.raises(FormatError, match=message):
            modelseal.tvm.load(tmp_path / f"sealed-{name}", identity=tiny["key"])
    assert zeroed == [True], zeroed  # the arity case is the one that gets as far as mapping the library
    with open("/proc/self/maps", "rb") as maps:
        assert b"/memfd:modelseal-tvm-" not in maps.read()


def test_missing_or_foreign_files_are_refused(tiny: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    for missing in ("model.so", "params.safetensors"):
        export = tmp_path / f"no-{missing}"
        shutil.copytree(tiny["model"].export_dir, export)
        (export / missing).unlink()
        with pytest.raises(FormatError, match=f"has no {missing}"):
            modelseal.tvm.load(export)
        modelseal.seal(export, tmp_path / f"sealed-no-{missing}", [tiny["identity"].recipient])
        with pytest.raises(FormatError, match=f"has no {missing}"):
            modelseal.tvm.load(tmp_path / f"sealed-no-{missing}", identity=tiny["key"])
    export = tmp_path / "not-a-library"
    shutil.copytree(tiny["model"].export_dir, export)
    (export / "model.so").write_bytes(b"\x7fELF not really")
    modelseal.seal(export, tmp_path / "sealed-not-a-library", [tiny["identity"].recipient])
    with pytest.raises(FormatError, match="TVM cannot load the compiled library"):
        modelseal.tvm.load(tmp_path / "sealed-not-a-library", identity=tiny["key"])


# ------------------------------------------------------------------------------------------ serving


@pytest.mark.slow
def test_served_sealed_tvm_model_answers_like_plain_tvm(tiny: dict[str, Any]) -> None:
    """`modelseal serve` loads the sealed model (a config with tensors, and one without them, completed
    from metadata.json) and answers tritonclient over HTTP exactly like plain TVM."""
    pytest.importorskip("tritonclient.http")
    import tritonclient.http as httpclient

    from .serving import ServeProcess

    repo = tiny["tmp"] / "repo"
    add_tvm_model(repo, "tiny_tvm", tiny["sealed"])
    add_tvm_model(repo, "tiny_tvm_auto", tiny["sealed"])
    (repo / "tiny_tvm_auto" / "config.pbtxt").write_text('name: "tiny_tvm_auto"\nplatform: "tvm"\nmax_batch_size: 8\n')
    add_tvm_model(repo, "tiny_tvm_plain", tiny["model"].export_dir, "model.tvm")
    server = ServeProcess(repo, tiny["tmp"] / "serve.log", extra=["-i", str(tiny["key"])])
    try:
        client = server.http_client()
        batch = tiny["model"].batch
        for name in ("tiny_tvm", "tiny_tvm_auto", "tiny_tvm_plain"):
            inp = httpclient.InferInput("x", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            result = client.infer(name, [inp], outputs=[httpclient.InferRequestedOutput("y")]).as_numpy("y")
            np.testing.assert_array_equal(result, tiny["model"].reference(batch))
        meta = client.get_model_metadata("tiny_tvm_auto")
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("x", "FP32", [-1, 4])]
    finally:
        assert server.stop() == 0
