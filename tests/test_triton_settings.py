"""The Triton model's settings, repository layout and batching, without a tritonserver (the fast tier); the
attacks of the Triton review: a key pasted where config.pbtxt names an identity (Triton shows the config to
any client), a tensor name that writes its own settings into config.pbtxt, a key check that is a busy
loop, a typo in capitals, and a batch whose output is not one row per input row (split, it handed one
request's rows to another)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import modelseal
from modelseal.errors import UsageError
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.repository import ModelSpec, TensorSpec
from modelseal.triton.layout import Layout, lay_out
from modelseal.triton.sealed import SealedModel
from modelseal.triton.settings import Settings, parse_settings

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def key_text(host_key: Path) -> str:
    return next(line for line in host_key.read_text().splitlines() if line.startswith("MODELSEAL-IDENTITY"))


def test_a_key_in_the_identity_parameter_is_refused_without_repeating_it(host_key: Path) -> None:
    key = key_text(host_key)
    with pytest.raises(UsageError) as refused:
        parse_settings({"identity": key})
    assert key not in str(refused.value) and key[20:40] not in str(refused.value)
    assert parse_settings({"identity": "agent:/run/modelseal/agent.sock"}).identity == "agent:/run/modelseal/agent.sock"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"key_check_s": "1e-300"}, "at least 0.5"),
        ({"grace_s": "604800"}, "between 0 and 3600"),
        ({"IDENTITY": "/k"}, "unknown modelseal parameter"),  # a typo in capitals is not Triton's
        ({"identiy": "/k"}, "unknown modelseal parameter"),
        ({"platform": "tvm"}, "inside Triton"),
        ({"threads": "-1"}, "threads"),
    ],
)
def test_bad_parameters_are_one_line_refusals(raw: dict[str, str], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        parse_settings(raw)
    assert parse_settings({"EXECUTION_ENV_PATH": "/venv", "key_check_s": "0"}).key_check_s == 0


def concat_model(path: Path, input_name: str = "x") -> Path:
    """``y = concat(x, x)`` along dim 0: an output that is not one row per input row."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 2])
    graph = helper.make_graph([helper.make_node("Concat", [input_name, input_name], ["y"], axis=0)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_tensor_name_cannot_write_settings_into_config_pbtxt(tmp_path: Path, host: HpkeIdentity,
                                                               host_key: Path) -> None:  # fmt: skip
    evil = 'x" } ] parameters { key: "grace_s" value { string_value: "604800" } } input [ { name: "z'
    plain = concat_model(tmp_path / "model.onnx", evil)
    sealed = tmp_path / "model.onnx.sealed"
    modelseal.seal(plain, sealed, [host.recipient], as_bundle=True)
    with pytest.raises(UsageError, match="tensor names"):
        lay_out(Layout(sealed, tmp_path / "repo", "evil", identity=str(host_key), serve_identity=str(host_key)))
    assert not (tmp_path / "repo" / "evil").exists()
    key = key_text(host_key)
    with pytest.raises(UsageError) as refused:  # a key as --serve-identity: refused, and not printed
        lay_out(Layout(sealed, tmp_path / "repo", "k", identity=str(host_key), serve_identity=key))
    assert key[20:40] not in str(refused.value)


def test_a_batch_whose_output_is_not_row_aligned_runs_request_by_request(tmp_path: Path, host: HpkeIdentity,
                                                                        host_key: Path) -> None:  # fmt: skip
    plain = concat_model(tmp_path / "model.onnx")
    sealed = tmp_path / "model.onnx.sealed"
    modelseal.seal(plain, sealed, [host.recipient], as_bundle=True)
    spec = ModelSpec("concat", tmp_path, "onnxruntime_onnx", 4, (TensorSpec("x", "FP32", (2,)),),
                     (TensorSpec("y", "FP32", (2,)),))  # fmt: skip
    model = SealedModel.load(spec, sealed, Settings(identity=str(host_key)))
    try:
        a, b = np.ones((1, 2), np.float32), np.full((2, 2), 2, np.float32)
        results = model.run_batch([({"x": a}, ["y"]), ({"x": b}, ["y"])])
        np.testing.assert_array_equal(results[0]["y"], np.concatenate([a, a]))  # type: ignore[index]
        np.testing.assert_array_equal(results[1]["y"], np.concatenate([b, b]))  # type: ignore[index]
    finally:
        model.close()


def test_serves_dynamic_batcher_does_not_hand_rows_to_other_requests(tmp_path: Path) -> None:
    from modelseal.serve.batching import DynamicBatcher

    session = ort.InferenceSession(str(concat_model(tmp_path / "model.onnx")), providers=["CPUExecutionProvider"])

    async def run(inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, inputs), strict=True))

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(run, max_batch_size=8, max_delay_s=0.05, name="concat")
        try:
            a, b = np.ones((1, 2), np.float32), np.full((2, 2), 2, np.float32)
            return list(await asyncio.gather(batcher.submit({"x": a}, ["y"]), batcher.submit({"x": b}, ["y"])))
        finally:
            await batcher.close()

    first, second = asyncio.run(main())
    np.testing.assert_array_equal(first["y"], np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(second["y"], np.full((4, 2), 2, np.float32))
