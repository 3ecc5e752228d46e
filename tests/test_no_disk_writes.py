"""Loading a sealed model opens no file for writing: proven with a Python audit hook in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
from modelseal.recipients.hpke import HpkeIdentity

from .write_audit import WRITE_AUDIT_HOOK

PROBE_IMPORTS = textwrap.dedent(
    """
    import os, sys, json
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import numpy, torch, onnxruntime, onnx  # import frameworks before auditing: imports may compile caches
    import modelseal, modelseal.torch, modelseal.onnx, modelseal.transformers
    """
)
PROBE = (
    PROBE_IMPORTS
    + WRITE_AUDIT_HOOK
    + textwrap.dedent(
        """
    d, key = sys.argv[1], sys.argv[2]
    sd = modelseal.torch.load_file(f"{d}/w.sealed.safetensors", identity=key)
    sess = modelseal.onnx.InferenceSession(f"{d}/m.onnx.sealed", identity=key)
    hf = modelseal.transformers.load_state_dict(f"{d}/hf", identity=key)
    with modelseal.safe_open(f"{d}/w.sealed.safetensors", "np", identity=key) as f:
        f.get_tensor("w")
    print(json.dumps({"writes": writes, "n": len(sd) + len(hf)}))
    """
    )
)


def test_loading_opens_nothing_for_writing(tmp_path: Path, host: HpkeIdentity, host_key: Path) -> None:
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "w.safetensors"))
    modelseal.seal(tmp_path / "w.safetensors", tmp_path / "w.sealed.safetensors", [host.recipient])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    modelseal.seal(tmp_path / "m.onnx", tmp_path / "m.onnx.sealed", [host.recipient])
    (tmp_path / "hfsrc").mkdir()
    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "hfsrc" / "model.safetensors"))
    (tmp_path / "hfsrc" / "config.json").write_text("{}")
    modelseal.seal(tmp_path / "hfsrc", tmp_path / "hf", [host.recipient])
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), str(host_key)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n"] == 2
    assert report["writes"] == [], report["writes"]


SERVE_FROM_START = WRITE_AUDIT_HOOK + textwrap.dedent(
    """
    import atexit, json, runpy
    atexit.register(lambda: print("WRITES " + json.dumps(writes), flush=True))
    sys.argv = ["modelseal", *sys.argv[1:]]
    runpy.run_module("modelseal", run_name="__main__")
    """
)


@pytest.mark.slow
def test_serve_writes_nothing_from_process_start(tmp_path: Path, host: HpkeIdentity, host_key: Path) -> None:
    """`modelseal serve` audited from its first line (before any framework import, unlike the probe above):
    it loads sealed ONNX and TorchScript models, answers over HTTP and gRPC and shuts down, and neither
    Python nor native code (ONNX Runtime's telemetry database under ~/.cache, ac0b701) writes a file.
    HOME, TMPDIR and the working directory are empty directories checked afterwards; the environment has
    no ORT_DISABLE_TELEMETRY (the test process sets it, and a user's shell does not)."""
    pytest.importorskip("tritonclient.grpc")
    torch = pytest.importorskip("torch")
    from .services import free_port, wait_for
    from .serving import add_model, export_onnx, export_torchscript, infer_grpc, infer_http

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    repo = tmp_path / "repo"
    add_model(repo, "m_onnx", "onnxruntime_onnx", export_onnx(model, (3, 4)), (3, 4), 3, recipients=[host.recipient])
    add_model(repo, "m_torch", "pytorch_libtorch", export_torchscript(model, (3, 4)), (3, 4), 3,
              recipients=[host.recipient])  # fmt: skip
    home, tmpdir, cwd = tmp_path / "home", tmp_path / "tmpdir", tmp_path / "cwd"
    for d in (home, tmpdir, cwd):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="1")
    http, grpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    args = ["serve", "-r", str(repo), "-i", str(host_key), "--http", http, "--grpc", grpc]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_FROM_START, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is None and "server ready" in log.read_text(), 120, f"serve ({log})")
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        batch = np.ones((2, 3, 4), np.float32)
        for name in ("m_onnx", "m_torch"):
            assert infer_http(httpclient.InferenceServerClient(http), name, batch).shape == (2, 3)
            assert infer_grpc(grpcclient.InferenceServerClient(grpc), name, batch).shape == (2, 3)
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    writes = json.loads(text.split("WRITES ", 1)[1].splitlines()[0])
    assert [w for w in writes if w != "/dev/null"] == [], writes  # (subprocess helpers open /dev/null)
    left = sorted(str(p.relative_to(tmp_path)) for d in (home, tmpdir, cwd) for p in d.rglob("*"))
    assert left == [], left
