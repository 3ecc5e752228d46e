"""TF Serving's API on `modelseal serve`, driven by TF Serving's own client package (tensorflow-serving-api)
over gRPC and by plain HTTPS requests to its REST API, both over mTLS: sealed SavedModels (two inputs,
strings included) and a sealed ONNX model answer exactly as TensorFlow and ONNX Runtime run directly, bad
requests get TF Serving's codes, and the requests land in the audit log under the client's certificate."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal

from .serving import ServeProcess, Tls, add_model, export_onnx, small_cnn

pytestmark = pytest.mark.slow

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")


def tensorflow() -> Any:
    if os.environ.get("CI"):
        import tensorflow as tf  # CI installs it (scripts/test.sh)

        return tf
    return pytest.importorskip("tensorflow")


def apis() -> Any:
    """TF Serving's client messages and stubs (the tensorflow-serving-api package, unchanged)."""
    tensorflow()
    from tensorflow_serving.apis import (  # type: ignore[import-not-found]
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    return (predict_pb2, get_model_metadata_pb2, get_model_status_pb2, prediction_service_pb2_grpc,
            model_service_pb2_grpc)


def two_input_model(path: Path) -> None:
    """A SavedModel with a float and a string input, and a float and a ``*_bytes`` string output."""
    tf = tensorflow()

    class Scorer(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.Generator.from_seed(7).normal([4, 3]))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.string, name="text")])  # fmt: skip
        def serve(self, x: Any, text: Any) -> dict[str, Any]:
            return {"scores": tf.matmul(x, self.w), "echo_bytes": tf.strings.join([text, b"\xff!"])}

    model = Scorer()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


def one_input_model(path: Path) -> None:
    tf = tensorflow()

    class Doubler(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="input")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"output": 2 * x + 1}

    model = Doubler()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    tmp = tmp_path_factory.mktemp("tfserving")
    identity = HpkeIdentity.generate(KEMS["x25519"])
    identity.save(tmp / "host.key")
    repo = tmp / "repo"
    for name, build in (("scorer", two_input_model), ("doubler", one_input_model)):
        build(tmp / f"{name}.savedmodel")
        (repo / name / "1").mkdir(parents=True)
        modelseal.seal(tmp / f"{name}.savedmodel", repo / name / "1" / "model.savedmodel.sealed",
                       [identity.recipient])  # fmt: skip
        config = f'name: "{name}"\nplatform: "tensorflow_savedmodel"\nmax_batch_size: 8\n'
        (repo / name / "config.pbtxt").write_text(config)
    cnn = small_cnn()
    onnx_bytes = export_onnx(cnn, (3, 32, 32))
    (tmp / "cnn.onnx").write_bytes(onnx_bytes)
    add_model(repo, "cnn", "onnxruntime_onnx", onnx_bytes, (3, 32, 32), 10, recipients=[identity.recipient])
    tls = Tls(tmp / "pki")
    audit = tmp / "audit.jsonl"
    server = ServeProcess(repo, tmp / "serve.log", tls=tls,
                          extra=["-i", str(tmp / "host.key"), "--audit-log", str(audit)])  # fmt: skip
    cert = tls.client("tf-client")
    try:
        yield {"server": server, "tmp": tmp, "tls": tls, "cert": cert, "audit": audit}
    finally:
        server.stop()


def channel(served: dict[str, Any], with_cert: bool = True) -> Any:
    tls, (cert, key) = served["tls"], served["cert"]
    credentials = grpc.ssl_channel_credentials(
        Path(tls.ca).read_bytes(),
        Path(key).read_bytes() if with_cert else None,
        Path(cert).read_bytes() if with_cert else None,
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(served["server"].grpc, credentials, options=options)


def https(served: dict[str, Any], with_cert: bool = True) -> Any:
    context = ssl.create_default_context(cafile=served["tls"].ca)
    if with_cert:
        context.load_cert_chain(*served["cert"])
    return httpx.Client(base_url=served["server"].base_url, verify=context, timeout=30)


def run_saved_model(served: dict[str, Any], name: str, **inputs: Any) -> dict[str, np.ndarray]:
    tf = tensorflow()
    model = tf.saved_model.load(str(served["tmp"] / f"{name}.savedmodel"))
    outputs = model.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


X = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
TEXT = np.array([b"a", b"\x00\xfe binary", "caf\u00e9".encode()], dtype=object)


def test_grpc_predict_with_the_official_client_matches_tensorflow(served: dict[str, Any]) -> None:
    tf = tensorflow()
    predict_pb2, _, _, prediction_grpc, _ = apis()
    expected = run_saved_model(served, "scorer", x=X, text=TEXT)
    stub = prediction_grpc.PredictionServiceStub(channel(served))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "scorer"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(TEXT.tolist()))
    response = stub.Predict(request, 30)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["scores"]), expected["scores"])
    assert tf.make_ndarray(response.outputs["echo_bytes"]).tolist() == expected["echo_bytes"].tolist()
    assert response.model_spec.name == "scorer" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"

    request.output_filter.append("scores")  # only what is asked for
    request.model_spec.version.value = 1
    filtered = stub.Predict(request, 30)
    assert list(filtered.outputs) == ["scores"]

    typed = predict_pb2.PredictRequest()  # values in float_val (not tensor_content), as other clients send
    typed.model_spec.name = "doubler"
    typed.inputs["input"].dtype = tf.float32.as_datatype_enum
    typed.inputs["input"].tensor_shape.dim.add(size=2)
    typed.inputs["input"].tensor_shape.dim.add(size=2)
    typed.inputs["input"].float_val.extend([1.0, 2.0, 3.0, 4.0])
    answer = tf.make_ndarray(stub.Predict(typed, 30).outputs["output"])
    np.testing.assert_array_equal(answer, np.array([[3, 5], [7, 9]], dtype=np.float32))


def test_an_onnx_model_answers_tf_serving_clients_too(served: dict[str, Any]) -> None:
    tf = tensorflow()
    import onnxruntime as ort

    predict_pb2, _, _, prediction_grpc, _ = apis()
    batch = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(served["tmp"] / "cnn.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": batch})[0]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.inputs["input"].CopyFrom(tf.make_tensor_proto(batch))
    response = prediction_grpc.PredictionServiceStub(channel(served)).Predict(request, 30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["output"]), expected, rtol=1e-5, atol=1e-5)
    with https(served) as client:
        rows = client.post("/v1/models/cnn:predict", json={"instances": batch.tolist()})
    assert rows.status_code == 200, rows.text
    np.testing.assert_allclose(np.array(rows.json()["predictions"], dtype=np.float32), expected, rtol=1e-5, atol=1e-5)


def test_metadata_and_status_with_the_official_client(served: dict[str, Any]) -> None:
    _, metadata_pb2, status_pb2, prediction_grpc, model_grpc = apis()
    ch = channel(served)
    request = metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "scorer"
    request.metadata_field.append("signature_def")
    response = prediction_grpc.PredictionServiceStub(ch).GetModelMetadata(request, 30)
    signatures = metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)  # TF Serving's type name
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert sorted(signature.inputs) == ["text", "x"] and sorted(signature.outputs) == ["echo_bytes", "scores"]
    assert signature.inputs["x"].dtype == 1 and [d.size for d in signature.inputs["x"].tensor_shape.dim] == [-1, 4]
    assert signature.inputs["text"].dtype == 7  # DT_STRING
    assert response.model_spec.version.value == 1

    status_request = status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "scorer"
    status = model_grpc.ModelServiceStub(ch).GetModelStatus(status_request, 30)
    (only,) = status.model_version_status
    assert only.version == 1 and only.state == status_pb2.ModelVersionStatus.AVAILABLE and only.status.error_code == 0

    with https(served) as client:
        rest_status = client.get("/v1/models/scorer").json()
        assert rest_status == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}  # fmt: skip
        meta = client.get("/v1/models/scorer/versions/1/metadata").json()
    inputs = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["x"]["dtype"] == "DT_FLOAT" and inputs["text"]["dtype"] == "DT_STRING"
    assert meta["model_spec"] == {"name": "scorer", "version": "1"}


def test_rest_predict_row_and_columnar_formats_match_tensorflow(served: dict[str, Any]) -> None:
    expected = run_saved_model(served, "scorer", x=X, text=TEXT)
    texts = [{"b64": base64.b64encode(t).decode()} for t in TEXT]
    with https(served) as client:
        rows = client.post("/v1/models/scorer:predict", json={
            "signature_name": "serving_default",
            "instances": [{"x": X[i].tolist(), "text": texts[i]} for i in range(len(X))],
        })  # fmt: skip
        columns = client.post("/v1/models/scorer/versions/1:predict", json={"inputs": {"x": X.tolist(), "text": texts}})
        single = client.post("/v1/models/doubler:predict", json={"instances": [[1, 2], [3.5, -1]]})
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    np.testing.assert_array_equal(np.array([p["scores"] for p in predictions], dtype=np.float32), expected["scores"])
    # an output named *_bytes comes back base64-encoded, as in TF Serving
    echoed = [base64.b64decode(p["echo_bytes"]["b64"]) for p in predictions]
    assert echoed == expected["echo_bytes"].tolist()
    assert columns.status_code == 200, columns.text
    outputs = columns.json()["outputs"]
    np.testing.assert_array_equal(np.array(outputs["scores"], dtype=np.float32), expected["scores"])
    assert single.status_code == 200, single.text
    assert single.json() == {"predictions": [[3.0, 5.0], [8.0, -1.0]]}


def grpc_error(call: Any, *args: Any) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, 30)
    return info.value.code(), info.value.details()


def test_bad_grpc_requests_get_tf_serving_codes(served: dict[str, Any]) -> None:
    tf = tensorflow()
    predict_pb2, metadata_pb2, status_pb2, prediction_grpc, model_grpc = apis()
    ch = channel(served)
    stub = prediction_grpc.PredictionServiceStub(ch)

    def request(name: str = "doubler", **inputs: Any) -> Any:
        r = predict_pb2.PredictRequest()
        r.model_spec.name = name
        for key, value in (inputs or {"input": np.ones((1, 2), np.float32)}).items():
            r.inputs[key].CopyFrom(value if hasattr(value, "dtype") and not isinstance(value, np.ndarray)
                                   else tf.make_tensor_proto(value))  # fmt: skip
        return r

    code, details = grpc_error(stub.Predict, request("nope"))
    assert code == grpc.StatusCode.NOT_FOUND and details == "Servable not found for request: Latest(nope)"
    r = request()
    r.model_spec.version.value = 7
    code, details = grpc_error(stub.Predict, r)
    assert code == grpc.StatusCode.NOT_FOUND and details == "Servable not found for request: Specific(doubler, 7)"
    r = request()
    r.model_spec.signature_name = "other"
    code, details = grpc_error(stub.Predict, r)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details == 'Serving signature key "other" not found.'
    code, details = grpc_error(stub.Predict, request(wrong=np.ones((1, 2), np.float32)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Sent extra: {wrong}. Missing but required: {input}." in details
    code, details = grpc_error(stub.Predict, request(input=np.ones((1, 2), np.float64)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FP32" in details
    code, _ = grpc_error(stub.Predict, request(input=np.ones((1, 5), np.float32)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    r = request()
    r.output_filter.append("nothing")
    code, details = grpc_error(stub.Predict, r)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found in signature: nothing" in details
    r = request()
    r.model_spec.version_label = "stable"
    code, _ = grpc_error(stub.Predict, r)
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    # 30 bytes that name 2**31 floats (TensorFlow repeats the one value given): refused before allocating
    huge = predict_pb2.PredictRequest()
    huge.model_spec.name = "doubler"
    huge.inputs["input"].dtype = 1
    huge.inputs["input"].tensor_shape.dim.add(size=2**30)
    huge.inputs["input"].tensor_shape.dim.add(size=2)
    huge.inputs["input"].float_val.append(1.0)
    code, details = grpc_error(stub.Predict, huge)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over the request limit" in details
    stray = request()
    stray.inputs["input"].ClearField("tensor_content")
    stray.inputs["input"].int_val.extend([1, 2])  # DT_FLOAT values in int_val: refused, not run on zeros
    code, details = grpc_error(stub.Predict, stray)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not int_val" in details

    many = request(**{f"in{i:05d}": np.ones(1, np.float32) for i in range(2000)})
    many.inputs[f"n{'x' * 100_000}"].CopyFrom(tf.make_tensor_proto(np.ones(1, np.float32)))
    code, details = grpc_error(stub.Predict, many)  # names echoed in full made megabytes of trailers
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 4000 and "more)" in details

    raw = ch.unary_unary("/tensorflow.serving.PredictionService/Predict")  # bytes that are no message
    code, details = grpc_error(raw, b"\x0a\xff\xff\xff\xff\x0f")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in details

    meta = metadata_pb2.GetModelMetadataRequest()
    meta.model_spec.name = "doubler"
    code, _ = grpc_error(stub.GetModelMetadata, meta)  # no metadata_field
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.GetModelStatusRequest()
    status.model_spec.name = "nope"
    code, details = grpc_error(model_grpc.ModelServiceStub(ch).GetModelStatus, status)
    assert code == grpc.StatusCode.NOT_FOUND and details == "Could not find any versions of model nope"


def test_bad_rest_requests_get_tf_serving_statuses(served: dict[str, Any]) -> None:
    with https(served) as client:
        def post(path: str, body: Any) -> Any:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return client.post(path, content=content, headers={"Content-Type": "application/json"})

        cases = [
            (post("/v1/models/nope:predict", {"instances": [[1, 2]]}), 404,
             "Servable not found for request: Latest(nope)"),
            (post("/v1/models/doubler:predict", b"{not json"), 400, ""),
            (post("/v1/models/doubler:predict", {"instances": [[1, 2], [3]]}), 400, "ragged"),
            (post("/v1/models/doubler:predict", {"instances": [[1, 2]], "inputs": [[1, 2]]}), 400, "exactly one"),
            (post("/v1/models/doubler:predict", {"instances": [["a", "b"]]}), 400, ""),
            (post("/v1/models/doubler:predict", {"signature_name": "x", "instances": [[1, 2]]}), 400,
             'Serving signature key "x" not found.'),
            (post("/v1/models/scorer:predict", {"instances": [[1, 2, 3, 4]]}), 400, "naming the inputs"),
            (post("/v1/models/doubler:classify", {"examples": []}), 501, "classify is not served"),
            # a million one-number rows cost a gigabyte of dicts before the batch size was checked
            (post("/v1/models/doubler:predict", {"instances": [1] * 1_000_000}), 400, "more than model doubler's"),
            (post("/v1/models/doubler:predict", {"instances": [[None, 1]]}), 400, "null"),
            (client.get("/v1/models/nope"), 404, "Could not find any versions of model nope"),
            (client.get("/v1/models/doubler/versions/9"), 404, "Could not find version 9 of model doubler"),
        ]  # fmt: skip
        for response, status, words in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert set(response.json()) == {"error"} and words in response.json()["error"], response.text


def test_mtls_and_audit_cover_the_tf_serving_api(served: dict[str, Any]) -> None:
    predict_pb2, _, _, prediction_grpc, _ = apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "doubler"
    with pytest.raises(grpc.RpcError):  # no client certificate: no connection
        prediction_grpc.PredictionServiceStub(channel(served, with_cert=False)).Predict(request, 10)
    with pytest.raises(httpx.HTTPError), https(served, with_cert=False) as anonymous:
        anonymous.post("/v1/models/doubler:predict", json={"instances": [[1, 2]]})
    with https(served) as client:
        assert client.post("/v1/models/doubler:predict", json={"instances": [[1, 2]]}).status_code == 200
    # one gRPC call of its own: under xdist this test may share its server with no other gRPC test
    typed = predict_pb2.PredictRequest()
    typed.model_spec.name = "doubler"
    typed.inputs["input"].dtype = 1  # DT_FLOAT
    typed.inputs["input"].tensor_shape.dim.add(size=1)
    typed.inputs["input"].tensor_shape.dim.add(size=2)
    typed.inputs["input"].float_val.extend([1.0, 2.0])
    prediction_grpc.PredictionServiceStub(channel(served)).Predict(typed, 30)
    records = [json.loads(line) for line in served["audit"].read_text().splitlines()]
    protocols = {r["protocol"] for r in records if r["model"] in ("doubler", "scorer", "nope")}
    assert {"tfserving-grpc", "tfserving-http"} <= protocols
    mine = [r for r in records if r["protocol"].startswith("tfserving") and r["status"] == "ok"]
    assert mine and all(r["client"] != "anonymous" for r in mine)


def test_names_a_client_chooses_stay_out_of_metrics_and_are_cut_in_audit_records(served: dict[str, Any]) -> None:
    """Every distinct unknown model name was a Prometheus series for the server's life (rendered at every
    scrape) and went whole into the audit log: 40 names of 1 MiB made /metrics 800 MiB."""
    predict_pb2, _, _, prediction_grpc, _ = apis()
    name = "m" * 300_000
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    code, _ = grpc_error(prediction_grpc.PredictionServiceStub(channel(served)).Predict, request)
    assert code == grpc.StatusCode.NOT_FOUND
    with https(served) as client:
        metrics = client.get("/metrics").text
    assert "m" * 1000 not in metrics and 'model="(unknown)"' in metrics
    assert 'model="doubler"' in metrics  # known models keep their name
    last = [json.loads(line) for line in served["audit"].read_text().splitlines() if '"mmmm' in line][-1]
    assert len(last["model"]) < 300 and last["model"].endswith("(300000 characters)")


def test_unloaded_model_reports_end_then_serves_again(served: dict[str, Any]) -> None:
    client = served["server"].http_client(served["cert"])
    client.unload_model("doubler")
    try:
        with https(served) as rest:
            status = rest.get("/v1/models/doubler").json()["model_version_status"]
            assert status[0]["state"] == "END" and status[0]["status"]["error_code"] == "UNAVAILABLE"
            answer = rest.post("/v1/models/doubler:predict", json={"instances": [[1, 2]]})
            assert answer.status_code == 503, answer.text
    finally:
        client.load_model("doubler")


def test_bench_client_speaks_tf_serving(served: dict[str, Any]) -> None:
    tls, (cert, key) = served["tls"], served["cert"]
    command = [sys.executable, "-m", "modelseal", "bench", "client", "--protocol", "tfserving", "--url",
               served["server"].grpc, "-m", "doubler", "--batch", "4", "--cnum", "2", "--loop", "5",
               "--ca", tls.ca, "--cert", cert, "--key", key, "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["protocol"] == "tfserving" and result["requests"] == 10 and result["errors"] == 0


OFFICIAL = {  # modelseal's message -> TF Serving's (or TensorFlow's) full name
    "TensorShapeProto": "tensorflow.TensorShapeProto", "TensorProto": "tensorflow.TensorProto",
    "TensorInfo": "tensorflow.TensorInfo", "SignatureDef": "tensorflow.SignatureDef",
    "ModelSpec": "tensorflow.serving.ModelSpec", "PredictRequest": "tensorflow.serving.PredictRequest",
    "PredictResponse": "tensorflow.serving.PredictResponse", "SignatureDefMap": "tensorflow.serving.SignatureDefMap",
    "GetModelMetadataRequest": "tensorflow.serving.GetModelMetadataRequest",
    "GetModelMetadataResponse": "tensorflow.serving.GetModelMetadataResponse",
    "StatusProto": "tensorflow.serving.StatusProto",
    "GetModelStatusRequest": "tensorflow.serving.GetModelStatusRequest",
    "ModelVersionStatus": "tensorflow.serving.ModelVersionStatus",
    "GetModelStatusResponse": "tensorflow.serving.GetModelStatusResponse",
}  # fmt: skip


def test_every_field_of_modelseals_messages_is_tf_servings() -> None:
    """modelseal's copy of the messages (its own package name, so the two never collide) must put every
    field where TF Serving's client puts it: same number, name, type, label and message type."""
    apis()
    from google.protobuf import descriptor_pool
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401 (services)

    from modelseal.serve.protocol import tfserving

    pool = descriptor_pool.Default()
    ours = tfserving()

    def official_name(full: str) -> str:
        if not full.startswith("modelseal.tfserving."):
            return full  # google.protobuf's own
        head, _, nested = full.removeprefix("modelseal.tfserving.").partition(".")
        return OFFICIAL.get(head, full) + (f".{nested}" if nested else "")

    def same_fields(mine: Any, theirs: Any) -> None:
        for field in mine.fields:
            other = theirs.fields_by_number[field.number]
            assert (field.name, field.type, field.is_repeated) == (other.name, other.type, other.is_repeated), field
            if field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    same_fields(field.message_type, other.message_type)
                else:
                    assert other.message_type.full_name == official_name(field.message_type.full_name), field
                    same_fields(field.message_type, other.message_type)
            if field.enum_type is not None:
                for value in field.enum_type.values:
                    assert other.enum_type.values_by_number[value.number].name == value.name

    for name, official in OFFICIAL.items():
        same_fields(getattr(ours, name).DESCRIPTOR, pool.FindMessageTypeByName(official))
    for service, method, request, response in (
        ("PredictionService", "Predict", "PredictRequest", "PredictResponse"),
        ("PredictionService", "GetModelMetadata", "GetModelMetadataRequest", "GetModelMetadataResponse"),
        ("ModelService", "GetModelStatus", "GetModelStatusRequest", "GetModelStatusResponse"),
    ):
        found = pool.FindServiceByName(f"tensorflow.serving.{service}").methods_by_name[method]
        assert (found.input_type.full_name, found.output_type.full_name) == (OFFICIAL[request], OFFICIAL[response])
