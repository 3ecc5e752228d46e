"""Sealed OpenVINO models: ``modelseal.openvino`` reads and compiles a sealed IR or ONNX model from memory
and answers exactly like the plain model run directly in OpenVINO; it writes nothing to disk (telemetry
and cache off); bad input is one clear error; ``modelseal serve`` serves it through Triton's
``backend: "openvino"`` config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
import modelseal.openvino as msov  # before openvino (none of these imports it): keeps its telemetry off
from modelseal.crypto.keys import wipe
from modelseal.errors import (
    AuthenticationError,
    FormatError,
    ModelsealError,
    NoMatchingIdentityError,
    SignatureError,
    UsageError,
)
from modelseal.recipients.hpke import HpkeIdentity

from .openvino_models import config, write_ir, write_onnx
from .write_audit import WRITE_AUDIT_HOOK

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, host: HpkeIdentity) -> dict[str, Path]:
    """A plain IR directory and ONNX file, and their sealed forms as a server's version directory holds them."""
    tmp = tmp_path_factory.mktemp("openvino")
    write_ir(tmp / "ir")
    write_onnx(tmp / "model.onnx")
    modelseal.seal(tmp / "ir", tmp / "model.xml.sealed", [host.recipient])
    modelseal.seal(tmp / "model.onnx", tmp / "model.onnx.sealed", [host.recipient], as_bundle=True)
    host.save(tmp / "host.key")
    return {"dir": tmp, "ir": tmp / "ir", "onnx": tmp / "model.onnx", "key": tmp / "host.key",
            "sealed_ir": tmp / "model.xml.sealed", "sealed_onnx": tmp / "model.onnx.sealed"}  # fmt: skip


def _run(compiled: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(compiled(x)[0])


def _one_line_error(exc: pytest.ExceptionInfo[ModelsealError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text and len(text) < 600, text
    return text


@pytest.mark.parametrize("kind", ["ir", "onnx"])
def test_sealed_model_matches_plain_openvino(models: dict[str, Path], kind: str) -> None:
    ref = write_ir(models["dir"] / "unused") if kind == "ir" else write_onnx(models["dir"] / "unused.onnx")
    plain_path = models["ir"] / "model.xml" if kind == "ir" else models["onnx"]
    core = ov.Core()
    expected = _run(core.compile_model(core.read_model(plain_path), "CPU"), ref.inputs["x"])
    np.testing.assert_array_equal(expected, ref.outputs["y"])  # exact: integers (see openvino_models)
    sealed = msov.compile_model(models[f"sealed_{kind}"], identity=str(models["key"]))
    np.testing.assert_array_equal(_run(sealed, ref.inputs["x"]), expected)
    plain = msov.compile_model(models[kind], "CPU", config={"INFERENCE_NUM_THREADS": 1})  # plain loads too
    np.testing.assert_array_equal(_run(plain, ref.inputs["x"]), expected)
    model = msov.read_model(models[f"sealed_{kind}"], identity=str(models["key"]))
    assert [p.get_any_name() for p in model.inputs] == ["x"]
    assert [p.get_any_name() for p in model.outputs] == ["y"]


def test_the_weights_survive_the_wipe_of_our_buffers(models: dict[str, Path]) -> None:
    """Our decrypted .bin is wiped at once: OpenVINO must hold its own copy, not point into ours (a
    tensor sharing our buffer would leave the model computing with zeros)."""
    from modelseal.load.bundles import read_all

    files = read_all(models["sealed_ir"], identity=str(models["key"]))
    model, weights = msov.model_from_files(files, "test")
    for data in files.values():
        wipe(data)
    ref = write_ir(models["dir"] / "unused")
    np.testing.assert_array_equal(_run(msov.compile_loaded(model, "CPU", None, "test"), ref.inputs["x"]),
                                  ref.outputs["y"])  # fmt: skip
    assert weights is not None and weights.data.any()


# ------------------------------------------------------------------------------------------ attacks


def test_a_tampered_sealed_file_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "model.xml.sealed"
    shutil.copytree(models["sealed_ir"], target)
    member = target / "model.bin"
    data = bytearray(member.read_bytes())
    data[-20] ^= 1
    member.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError) as exc:
        msov.compile_model(target, identity=str(models["key"]))
    _one_line_error(exc)


def test_the_wrong_key_is_refused(models: dict[str, Path], other_host: HpkeIdentity, tmp_path: Path) -> None:
    other_host.save(tmp_path / "other.key")
    with pytest.raises(NoMatchingIdentityError) as exc:
        msov.compile_model(models["sealed_onnx"], identity=str(tmp_path / "other.key"))
    _one_line_error(exc)


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt_xml"])
def test_a_broken_ir_is_one_clear_error(models: dict[str, Path], host: HpkeIdentity, tmp_path: Path,
                                        damage: str) -> None:  # fmt: skip
    broken = tmp_path / "ir"
    shutil.copytree(models["ir"], broken)
    if damage == "missing":
        (broken / "model.bin").unlink()
    elif damage == "truncated":
        (broken / "model.bin").write_bytes((models["ir"] / "model.bin").read_bytes()[:40])
    else:
        (broken / "model.xml").write_bytes((models["ir"] / "model.xml").read_bytes()[:300])
    modelseal.seal(broken, tmp_path / "model.xml.sealed", [host.recipient])
    expected = {"missing": "not its weights model.bin", "truncated": "Incorrect weights in bin file",
                "corrupt_xml": "OpenVINO cannot read model.xml"}[damage]  # fmt: skip
    for path, identity in ((tmp_path / "model.xml.sealed", str(models["key"])), (broken, None)):
        with pytest.raises(FormatError) as exc:
            msov.compile_model(path, identity=identity)
        text = _one_line_error(exc)
        if path.name.endswith(".sealed"):
            assert expected in text, text
        else:  # the plain IR: the same damage, read by OpenVINO from the path
            assert "model.bin" in text or "cannot read" in text, text


def test_onnx_external_data_is_refused(host: HpkeIdentity, models: dict[str, Path], tmp_path: Path) -> None:
    """Given a model from memory, OpenVINO reads an external tensor's file from the working directory."""
    import onnx

    proto = onnx.load(models["onnx"])
    (tmp_path / "ext").mkdir()
    onnx.save_model(proto, tmp_path / "ext" / "model.onnx", save_as_external_data=True, location="w.data",
                    size_threshold=0)  # fmt: skip
    modelseal.seal(tmp_path / "ext", tmp_path / "model.onnx.sealed", [host.recipient])
    with pytest.raises(FormatError, match="keeps its data in an external file") as exc:
        msov.compile_model(tmp_path / "model.onnx.sealed", identity=str(models["key"]))
    _one_line_error(exc)


def test_settings_that_would_write_the_model_are_refused(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:  # fmt: skip
    key = str(models["key"])
    with pytest.raises(UsageError, match="CACHE_DIR"):
        msov.compile_model(models["sealed_ir"], identity=key, config={"CACHE_DIR": str(tmp_path)})
    monkeypatch.setenv("OV_ENABLE_SERIALIZE_TRACING", "1")
    with pytest.raises(UsageError, match="OV_ENABLE_SERIALIZE_TRACING is set"):
        msov.compile_model(models["sealed_ir"], identity=key)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("OV_ENABLE_SERIALIZE_TRACING", "0")
    msov.compile_model(models["sealed_ir"], identity=key)


def test_a_trusted_signer_refuses_a_plain_model(models: dict[str, Path], signer: modelseal.Signer) -> None:
    with pytest.raises(SignatureError):
        msov.read_model(models["ir"], trusted_signers=[signer.public])


# ------------------------------------------------------------------------------------ no disk writes

PROBE = (
    textwrap.dedent(
        """
        import sys, json
        import modelseal.openvino as msov  # first: OpenVINO's telemetry stays off
        import numpy, openvino  # frameworks before auditing: first imports may compile caches
        """
    )
    + WRITE_AUDIT_HOOK
    + textwrap.dedent(
        """
        ir, onnx, key = sys.argv[1:4]
        x = numpy.ones((2, 8), numpy.float32)
        shapes = [msov.compile_model(p, identity=key)(x)[0].shape for p in (ir, onnx)]
        print(json.dumps({"writes": writes, "shapes": shapes}))
        """
    )
)


def test_sealed_load_and_compile_write_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    """In a fresh interpreter whose HOME, TMPDIR and working directory are empty: loading and compiling a
    sealed IR and a sealed ONNX model opens nothing for writing (audit hook), and nothing appears in those
    directories afterwards (OpenVINO's telemetry would write ~/intel/openvino_ga_cid at import)."""
    home, tmpdir, cwd = tmp_path / "home", tmp_path / "tmpdir", tmp_path / "cwd"
    for d in (home, tmpdir, cwd):
        d.mkdir()
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "XDG_CACHE_HOME")}  # CI=true turns telemetry off
    env.update(HOME=str(home), TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(models["sealed_ir"]), str(models["sealed_onnx"]), str(models["key"])],
        capture_output=True, text=True, timeout=120, env=env, cwd=cwd,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shapes"] == [[2, 4], [2, 4]]
    assert report["writes"] == [], report["writes"]
    left = sorted(str(p.relative_to(tmp_path)) for d in (home, tmpdir, cwd) for p in d.rglob("*"))
    assert left == [], left


def test_importing_the_runtime_imports_no_framework() -> None:
    code = "import sys, modelseal.serve.runtimes.openvino; print('openvino' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ serving runtime


def test_the_runtime_declares_the_model_and_zeroes_its_weights(models: dict[str, Path], host: HpkeIdentity) -> None:
    """With an empty config (completed from ``declared()`` by the server), run, check and close."""
    from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec
    from modelseal.serve.runtimes.openvino import InvalidArgument, OpenVinoRuntime
    from modelseal.serve.source import open_source

    ref = write_ir(models["dir"] / "unused")
    spec = ModelSpec("tiny", models["dir"], "openvino", 0, (), ())
    for path in (models["sealed_ir"], models["sealed_onnx"], models["ir"] / "model.xml", models["onnx"]):
        with open_source(path, lambda: host) as source:
            runtime = OpenVinoRuntime(spec, source, 1)
        assert runtime.declared() == ({"x": ("FP32", (None, 8))}, {"y": ("FP32", (None, 4))})
        np.testing.assert_array_equal(runtime.run(ref.inputs, ["y"])["y"], ref.outputs["y"])
        with pytest.raises(InvalidArgument, match=r"input 'x' has shape \[2, 5\]"):
            runtime.run({"x": np.ones((2, 5), np.float32)}, ["y"])
        batching = ModelSpec("tiny", models["dir"], "openvino", 8, (TensorSpec("x", "FP32", (8,)),),
                             (TensorSpec("y", "FP32", (4,)),))  # fmt: skip
        runtime.check(batching)
        wrong = ModelSpec("tiny", models["dir"], "openvino", 8, (TensorSpec("x", "FP64", (9,)),),
                          (TensorSpec("y", "FP32", (4,)),))  # fmt: skip
        with pytest.raises(ConfigError, match="input 'x' is FP64 in the config but FP32 in the model"):
            runtime.check(wrong)
        weights = runtime._weights
        runtime.close()
        if path == models["sealed_ir"]:
            assert weights is not None and not weights.data.any(), "the weights tensor is zeroed on unload"


@pytest.fixture(scope="module")
def served(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("tritonclient.http")
    from .serving import ServeProcess

    tmp = tmp_path_factory.mktemp("ovserve")
    repo = tmp / "repo"
    layouts = {"ov_ir": [models["sealed_ir"]], "ov_onnx": [models["sealed_onnx"]],
               "ov_plain": [models["ir"] / "model.xml", models["ir"] / "model.bin"]}  # fmt: skip
    for name, files in layouts.items():
        version = repo / name / "1"
        version.mkdir(parents=True)
        for f in files:
            (shutil.copytree if f.is_dir() else shutil.copy)(f, version / f.name)
        (repo / name / "config.pbtxt").write_text(config(name))
    shutil.copytree(repo / "ov_ir" / "1", repo / "ov_auto" / "1")  # a config completed from declared()
    (repo / "ov_auto" / "config.pbtxt").write_text('backend: "openvino"\n')
    shutil.copytree(repo / "ov_ir" / "1", repo / "ov_loose" / "1")  # a -1 where the model's dim is fixed
    (repo / "ov_loose" / "config.pbtxt").write_text(config("ov_loose").replace("dims: [ 8 ]", "dims: [ -1 ]"))
    (repo / "ov_wrong").mkdir()  # a config that disagrees with the model
    shutil.copytree(repo / "ov_ir" / "1", repo / "ov_wrong" / "1")
    (repo / "ov_wrong" / "config.pbtxt").write_text(config("ov_wrong").replace("dims: [ 8 ]", "dims: [ 9 ]"))
    scratch = tmp / "scratch"  # the server's HOME and TMPDIR: must stay empty
    scratch.mkdir()
    server = ServeProcess(repo, tmp / "serve.log", extra=["-i", str(models["key"])],
                          env={"HOME": str(scratch), "TMPDIR": str(scratch)})  # fmt: skip
    try:
        yield server, scratch
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_answers_like_plain_openvino(served: Any, models: dict[str, Path]) -> None:
    import tritonclient.http as httpclient

    server, scratch = served
    ref = write_ir(models["dir"] / "unused")
    core = ov.Core()
    expected = _run(core.compile_model(core.read_model(models["ir"] / "model.xml"), "CPU"), ref.inputs["x"])
    client = server.http_client()
    for name in ("ov_ir", "ov_onnx", "ov_plain", "ov_auto"):
        inp = httpclient.InferInput("x", list(ref.inputs["x"].shape), "FP32")
        inp.set_data_from_numpy(ref.inputs["x"])
        got = client.infer(name, [inp], outputs=[httpclient.InferRequestedOutput("y")]).as_numpy("y")
        np.testing.assert_array_equal(got, expected)
        meta = client.get_model_metadata(name)
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    from tritonclient.utils import InferenceServerException

    inp = httpclient.InferInput("x", [2, 5], "FP32")  # the config allows it, the model does not: a 400
    inp.set_data_from_numpy(np.ones((2, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"input 'x' has shape \[2, 5\]") as refused:
        client.infer("ov_loose", [inp])
    assert refused.value.status() == "400"
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["ov_wrong"]["state"] == "UNAVAILABLE"
    assert "has shape [-1, 9] in the config but [-1, 8] in the model" in index["ov_wrong"]["reason"]
    assert list(scratch.rglob("*")) == [], "the server wrote under HOME/TMPDIR (telemetry?)"
