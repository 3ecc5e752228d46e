"""A Triton-style repository with no configs at all, as a Triton user drops models into one: sealed ONNX,
TorchScript, state-dict, SavedModel, OpenVINO and TVM models, each served with a config completed from the
model itself and answering exactly as the framework run directly -- through tritonclient (HTTP JSON,
HTTP binary, gRPC) and the KServe Python SDK (REST and gRPC). Then the repository protocol as Triton
behaves: config and statistics (HTTP and gRPC), version policies, a load with a config override, unload
of an unloaded model, JSON errors on unknown routes, gRPC ModelReady on an unknown model, classification,
and ``--strict-config``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import modelseal
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .serving import ServeProcess

pytestmark = pytest.mark.slow  # real processes and every framework: the full suite, not the fast tier

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
FEATURES, CLASSES = 4, 3


@dataclass
class Case:
    """One model in the repository: the input it is asked, and what the framework itself answers."""

    name: str
    platform: str
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    max_batch_size: int


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal((FEATURES, CLASSES)).astype(np.float32), rng.standard_normal(CLASSES).astype(np.float32)


def _batch(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(8).standard_normal((rows, FEATURES)).astype(np.float32)


def _seal(plain: Path, target: Path, recipient: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    modelseal.seal(plain, target, [recipient], as_bundle=plain.is_file() and plain.suffix != ".safetensors")


def _torch_mlp() -> Any:
    import torch
    from torch import nn

    w, b = _weights()

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(FEATURES, CLASSES)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(w.T.copy()))
                self.fc.bias.copy_(torch.from_numpy(b))
            self.example_inputs = [torch.zeros(2, FEATURES)]  # what it tells about its input (scripting keeps it)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    return Mlp().eval()


MODEL_PY = f'''
import torch
from torch import nn


def model():
    return nn.Sequential(nn.Linear({FEATURES}, {CLASSES}), nn.ReLU())


def example_inputs():
    return [torch.zeros(2, {FEATURES})]
'''


def build_repository(repo: Path, scratch: Path, recipient: Any) -> list[Case]:
    """Every model kind, sealed, without a config; returns what each must answer."""
    import torch
    from safetensors.torch import save_file

    from .openvino_models import write_ir
    from .tvm_models import build_tiny

    x = _batch()
    w, b = _weights()
    relu = np.maximum(x @ w + b, 0)
    cases = []

    mlp = _torch_mlp()  # ONNX, exported by torch, run by ONNX Runtime for the reference
    import onnxruntime as ort
    from bench.models import export_onnx

    onnx_bytes = export_onnx(mlp, (FEATURES,))
    (scratch / "m.onnx").write_bytes(onnx_bytes)
    _seal(scratch / "m.onnx", repo / "onnx" / "1" / "model.onnx.sealed", recipient)
    expected = ort.InferenceSession(onnx_bytes).run(None, {"input": x})[0]
    cases.append(Case("onnx", "onnxruntime_onnx", {"input": x}, {"output": expected}, 4))

    scripted = torch.jit.script(mlp)  # TorchScript: names from forward, types and shapes from example_inputs
    torch.jit.save(scripted, str(scratch / "m.pt"))
    _seal(scratch / "m.pt", repo / "torchscript" / "1" / "model.pt.sealed", recipient)
    with torch.inference_mode():
        expected = scripted(torch.from_numpy(x)).numpy()
    cases.append(Case("torchscript", "pytorch_libtorch", {"x": x}, {"OUTPUT__0": expected}, 0))

    (repo / "statedict").mkdir(parents=True)  # a state dict: model.py's model() and example_inputs()
    (repo / "statedict" / "model.py").write_text(MODEL_PY)
    state = {"0.weight": torch.from_numpy(w.T.copy()), "0.bias": torch.from_numpy(b)}
    save_file(state, str(scratch / "m.safetensors"))
    _seal(scratch / "m.safetensors", repo / "statedict" / "1" / "model.safetensors.sealed", recipient)
    cases.append(Case("statedict", "pytorch_libtorch", {"input": x}, {"OUTPUT__0": relu}, 0))

    import tensorflow as tf  # a SavedModel whose signature batches

    class Dense(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = tf.Variable(w), tf.Variable(b)

        @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="x")])
        def serve(self, v: Any) -> dict[str, Any]:
            return {"y": tf.nn.relu(tf.matmul(v, self.w) + self.b)}

    dense = Dense()
    tf.saved_model.save(dense, str(scratch / "m.savedmodel"), signatures={"serving_default": dense.serve})
    _seal(scratch / "m.savedmodel", repo / "savedmodel" / "1" / "model.savedmodel.sealed", recipient)
    cases.append(Case("savedmodel", "tensorflow_savedmodel", {"x": x}, {"y": dense.serve(x)["y"].numpy()}, 4))

    reference = write_ir(scratch / "ir")  # OpenVINO IR (xml + bin), sealed as a directory
    _seal(scratch / "ir", repo / "openvino" / "1" / "model.xml.sealed", recipient)
    cases.append(Case("openvino", "openvino", reference.inputs, reference.outputs, 4))

    tiny = build_tiny(scratch / "tvm")  # a compiled TVM module + params + metadata, sealed as a directory
    _seal(scratch / "tvm", repo / "tvm" / "1" / "model.tvm.sealed", recipient)
    rows = tiny.batch[:2]  # within the default max_batch_size a completed config gets (4)
    cases.append(Case("tvm", "tvm", {"x": rows}, {"y": tiny.reference(rows)}, 4))
    return cases


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("repository")
    identity = HpkeIdentity.generate(KEMS["x25519"])
    identity.save(tmp / "host.key")
    scratch = tmp / "plain"
    scratch.mkdir()
    cases = build_repository(tmp / "repo", scratch, identity.recipient)
    assert not list((tmp / "repo").rglob("config.*"))
    add_versions(tmp / "repo")
    server = ServeProcess(tmp / "repo", tmp / "serve.log", extra=["-i", str(tmp / "host.key")])
    try:
        yield {"server": server, "cases": cases, "tmp": tmp}
    finally:
        server.stop()


def add_versions(repo: Path) -> None:
    """Models with three versions (1: x+1, 2: x+2, 3: x+3) under each version policy, and one with labels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def add_one(path: Path, amount: float) -> None:
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "c"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", FEATURES])],
            [numpy_helper.from_array(np.full(FEATURES, amount, np.float32), "c")],
        )  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    policies = {"latest2": "latest { num_versions: 2 }", "every": "all { }", "pick": "specific { versions: [1, 3] }",
                "newest": None}  # fmt: skip
    for name, policy in policies.items():
        for version in (1, 2, 3):
            add_one(repo / name / str(version) / "model.onnx", version)
        if policy:
            (repo / name / "config.pbtxt").write_text(f"version_policy: {{ {policy} }}\n")
    strings = helper.make_graph(  # BYTES in and out: upper-cases its strings
        [helper.make_node("StringNormalizer", ["text"], ["upper"], case_change_action="UPPER", locale="C")], "s",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("upper", TensorProto.STRING, ["n"])],
    )  # fmt: skip
    (repo / "strings" / "1").mkdir(parents=True)
    onnx.save_model(helper.make_model(strings, opset_imports=[helper.make_opsetid("", 17)]),
                    repo / "strings" / "1" / "model.onnx")  # fmt: skip
    (repo / "strings" / "config.pbtxt").write_text("max_batch_size: 0\n")
    add_one(repo / "labelled" / "1" / "model.onnx", 0)
    (repo / "labelled" / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    (repo / "labelled" / "config.pbtxt").write_text('max_batch_size: 4\noutput [ { name: "y" data_type: TYPE_FP32 '
                                                    'dims: [ 4 ] label_filename: "labels.txt" } ]\n')  # fmt: skip


# --- every model kind, every client ---------------------------------------------------------------------


def _tritonclient(module: Any, client: Any, case: Case, binary: bool | None) -> dict[str, np.ndarray]:
    inputs = []
    for name, array in case.inputs.items():
        tensor = module.InferInput(name, list(array.shape), "FP32")
        if binary is None:
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    kwargs = {} if binary is None else {"binary_data": binary}
    outputs = [module.InferRequestedOutput(name, **kwargs) for name in case.expected]
    result = client.infer(case.name, inputs, outputs=outputs)
    return {name: result.as_numpy(name) for name in case.expected}


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, use_grpc, model, inputs = sys.argv[1], sys.argv[2] == "grpc", sys.argv[3], json.loads(sys.argv[4])
datatype = sys.argv[5]

async def ask():
    tensors = []
    for name, values in inputs.items():
        array = np.asarray(values, np.float32) if datatype == "FP32" else np.array(values, dtype=object)
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=False)
        tensors.append(tensor)
    request = InferRequest(model_name=model, infer_inputs=tensors)
    if use_grpc:
        client = InferenceGRPCClient(url)
        try:
            return await client.infer(request)
        finally:
            await client.close()
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        return await client.infer(f"http://{url}", request, model_name=model)
    finally:
        await client.close()

response = asyncio.run(ask())
def plain(value):
    return value.decode() if isinstance(value, bytes) else value

print(json.dumps({out.name: [plain(v) for v in out.as_numpy().ravel().tolist()] for out in response.outputs}))
"""


def _kserve(case: Case, url: str, grpc: bool, datatype: str = "FP32") -> dict[str, np.ndarray]:
    """The KServe SDK's V2 client, in a process of its own: its generated protocol module and
    tritonclient's define the same protobuf names, which one process cannot hold twice. Outputs come
    back flat (BYTES as text)."""
    inputs = json.dumps({name: array.tolist() for name, array in case.inputs.items()})
    run = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, url, "grpc" if grpc else "rest", case.name, inputs,
                          datatype], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.splitlines()[-1])
    return {name: np.asarray(values).reshape(case.expected[name].shape) for name, values in answer.items()}


def test_bytes_round_trip_through_the_kserve_sdk(served: dict[str, Any]) -> None:
    """BYTES (JSON strings over REST, bytes_contents over gRPC) from the KServe SDK; tritonclient's BYTES
    and BF16 round trips are in tests/test_serve_datatypes.py. (The KServe SDK 0.21 cannot send BF16: its
    numpy codec has no bfloat16.)"""
    server = served["server"]
    case = Case("strings", "onnxruntime_onnx", {"text": np.array(["abc", "Hello, World", ""], dtype=object)},
                {"upper": np.array(["ABC", "HELLO, WORLD", ""], dtype=object)}, 0)  # fmt: skip
    for grpc, url in ((False, server.http), (True, server.grpc)):
        assert _kserve(case, url, grpc, datatype="BYTES")["upper"].tolist() == ["ABC", "HELLO, WORLD", ""]


def test_a_repository_without_configs_serves_every_model_kind_to_every_client(served: dict[str, Any]) -> None:
    server = served["server"]
    http, grpc = server.http_client(), server.grpc_client()
    ways: dict[str, Callable[[Case], dict[str, np.ndarray]]] = {
        "http json": lambda c: _tritonclient(httpclient, http, c, binary=False),
        "http binary": lambda c: _tritonclient(httpclient, http, c, binary=True),
        "grpc": lambda c: _tritonclient(grpcclient, grpc, c, binary=None),
        "kserve rest": lambda c: _kserve(c, server.http, grpc=False),
        "kserve grpc": lambda c: _kserve(c, server.grpc, grpc=True),
    }
    for case in served["cases"]:
        assert http.is_model_ready(case.name), (case.name, http.get_model_repository_index())
        for way, ask in ways.items():
            answer = ask(case)
            for name, expected in case.expected.items():
                np.testing.assert_allclose(answer[name], expected, rtol=1e-5, atol=1e-5, err_msg=f"{case.name} {way}")


def test_completed_configs_and_metadata_describe_each_model(served: dict[str, Any]) -> None:
    server = served["server"]
    http, grpc = server.http_client(), server.grpc_client()
    for case in served["cases"]:
        config = http.get_model_config(case.name)
        batching = case.max_batch_size > 0
        assert config["platform"] == case.platform and config["max_batch_size"] == case.max_batch_size, config
        assert [t["name"] for t in config["input"]] == list(case.inputs), config
        assert [t["name"] for t in config["output"]] == list(case.expected), config
        for declared, array in zip(config["input"], case.inputs.values(), strict=True):
            assert declared["data_type"] == "TYPE_FP32"
            assert declared["dims"] == (list(array.shape[1:]) if batching else list(array.shape)), (case.name, config)
        via_grpc = grpc.get_model_config(case.name, as_json=True)["config"]  # Triton's own message definition
        assert via_grpc["name"] == case.name and via_grpc["platform"] == case.platform
        assert [t["name"] for t in via_grpc["input"]] == list(case.inputs)
        assert int(via_grpc.get("max_batch_size", 0)) == case.max_batch_size
        metadata = http.get_model_metadata(case.name)
        first = [-1] if batching else []
        assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
            (name, "FP32", first + [int(d) for d in config["input"][i]["dims"]]) for i, name in enumerate(case.inputs)
        ]


def test_statistics_move_after_requests(served: dict[str, Any]) -> None:
    server = served["server"]
    http, grpc = server.http_client(), server.grpc_client()
    case = next(c for c in served["cases"] if c.name == "onnx")
    before = http.get_inference_statistics(case.name)["model_stats"][0]
    for _ in range(3):
        _tritonclient(httpclient, http, case, binary=True)
    wrong = httpclient.InferInput("nope", [1, FEATURES], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, FEATURES), np.float32))
    with pytest.raises(Exception, match="expects inputs"):  # a failure is counted as one
        http.infer(case.name, [wrong])
    after = http.get_inference_statistics(case.name)["model_stats"][0]
    assert after["name"] == "onnx" and after["version"] == "1"
    rows = case.inputs["input"].shape[0]
    assert after["inference_count"] - before["inference_count"] == 3 * rows
    assert after["execution_count"] - before["execution_count"] == 3
    success, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3 and success["ns"] > 0
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_stats"]["compute_infer"]["count"] >= 3 and after["last_inference"] > 0
    assert any(b["batch_size"] == rows for b in after["batch_stats"])
    via_grpc = grpc.get_inference_statistics(case.name, as_json=True)["model_stats"][0]
    assert int(via_grpc["inference_count"]) == after["inference_count"]
    everything = {s["name"] for s in http.get_inference_statistics()["model_stats"]}
    assert {c.name for c in served["cases"]} <= everything


def _added(http: Any, name: str, version: str = "") -> float:
    x = np.zeros((1, FEATURES), np.float32)
    tensor = httpclient.InferInput("x", [1, FEATURES], "FP32")
    tensor.set_data_from_numpy(x)
    return float(http.infer(name, [tensor], model_version=version).as_numpy("y")[0, 0])


def test_version_policies_are_honoured(served: dict[str, Any]) -> None:
    http = served["server"].http_client()
    loaded = {(m["name"], m.get("version", "")) for m in http.get_model_repository_index() if m["state"] == "READY"}
    expected = {"latest2": ["2", "3"], "every": ["1", "2", "3"], "pick": ["1", "3"], "newest": ["3"]}
    for name, versions in expected.items():
        assert {v for n, v in loaded if n == name} == set(versions), (name, loaded)
        assert http.get_model_metadata(name)["versions"] == versions
        for version in versions:
            assert http.is_model_ready(name, version) and _added(http, name, version) == float(version)
        assert _added(http, name) == float(versions[-1])  # no version: the newest served
        for version in {"1", "2", "3"} - set(versions):
            assert not http.is_model_ready(name, version)
            with pytest.raises(Exception, match="no ready version"):
                _added(http, name, version)
    stats = http.get_inference_statistics("every")["model_stats"]
    assert [s["version"] for s in stats] == ["1", "2", "3"]


def test_load_with_a_config_override_and_unload_of_an_unloaded_model(served: dict[str, Any]) -> None:
    server = served["server"]
    load = f"http://{server.http}/v2/repository/models/every/load"
    http, grpc = server.http_client(), server.grpc_client()
    http.load_model("every", config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))
    assert http.get_model_metadata("every")["versions"] == ["2"] and _added(http, "every") == 2.0
    grpc.load_model("every", config=json.dumps({"version_policy": {"all": {}}, "max_batch_size": 2}))
    assert http.get_model_metadata("every")["versions"] == ["1", "2", "3"]
    assert http.get_model_config("every")["max_batch_size"] == 2
    refused = {json.dumps({"platform": "nope"}): "may not set platform", "{not json": "load request config",
               json.dumps({"name": "other"}): "differs from",
               json.dumps({"default_model_filename": "/etc/passwd"}): "may not set default_model_filename",
               json.dumps({"version_policy": {"all": {}}, "input": [{"name": "x", "data_type": "TYPE_STRING",
                                                                    "dims": [4]}]}): "BYTES in the config"}  # fmt: skip
    for bad, why in refused.items():
        r = httpx.post(load, json={"parameters": {"config": bad}})
        assert r.status_code == 400 and why in r.json()["error"], r.text
    assert http.get_model_metadata("every")["versions"] == ["1", "2", "3"]  # a refused reload keeps serving
    r = httpx.post(load, json={"parameters": {"file:1/model.onnx": "x"}})
    assert r.status_code == 400 and "cannot be sent" in r.json()["error"]
    http.load_model("every")  # without an override: the file's config again

    http.unload_model("newest")
    assert not http.is_model_ready("newest")
    http.unload_model("newest")  # already unloaded: a success, as in Triton
    grpc.unload_model("newest")
    with pytest.raises(Exception, match="unknown model"):
        http.unload_model("no-such-model")
    http.load_model("newest")
    assert http.is_model_ready("newest")


def test_unknown_routes_and_models_answer_as_triton_does(served: dict[str, Any]) -> None:
    server = served["server"]
    for method, path in (("GET", "/v2/nothing/here"), ("POST", "/v2/models/onnx/explain"), ("DELETE", "/v2")):
        r = httpx.request(method, f"http://{server.http}{path}")
        assert r.status_code in (404, 405) and r.headers["content-type"].startswith("application/json"), r.text
        assert path in r.json()["error"]
    with pytest.raises(Exception) as caught:
        server.grpc_client().is_model_ready("no-such-model")
    assert "NOT_FOUND" in str(caught.value) or "StatusCode.NOT_FOUND" in repr(caught.value)
    assert httpx.get(f"http://{server.http}/v2/models/no-such-model/ready").status_code == 404
    assert not server.http_client().is_model_ready("onnx", "9")


def test_classification_answers_the_top_classes_with_their_labels(served: dict[str, Any]) -> None:
    server = served["server"]
    x = np.array([[0.5, 3.0, -1.0, 2.0], [9.0, 1.0, 2.0, 3.0]], np.float32)
    answers = []
    for module, client in ((httpclient, server.http_client()), (grpcclient, server.grpc_client())):
        tensor = module.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("labelled", [tensor], outputs=[module.InferRequestedOutput("y", class_count=2)])
        answers.append(result.as_numpy("y"))
    for top in answers:
        assert top.shape == (2, 2)
        rows = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in top]
        assert rows == [["3.000000:1:one", "2.000000:3:three"], ["9.000000:0:zero", "3.000000:3:three"]], rows


def test_strict_config_refuses_what_it_would_complete(served: dict[str, Any], tmp_path: Path) -> None:
    from modelseal.serve.repository import ConfigError, Repository

    repo = tmp_path / "repo"
    shutil.copytree(served["tmp"] / "repo" / "onnx", repo / "onnx")
    assert Repository(repo).spec("onnx").platform == "onnxruntime_onnx"  # told from model.onnx.sealed
    with pytest.raises(ConfigError, match="--strict-config requires one"):
        Repository(repo, strict=True).spec("onnx")
    (repo / "onnx" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    with pytest.raises(ConfigError, match="no inputs declared"):
        Repository(repo, strict=True).spec("onnx")
