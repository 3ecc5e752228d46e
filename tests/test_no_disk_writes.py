"""Loading a sealed model opens no file for writing: proven with a Python audit hook in a fresh process."""

from __future__ import annotations

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
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n"] == 2
    assert report["writes"] == [], report["writes"]
