"""A sealed TensorFlow SavedModel served by `modelseal serve`: decrypted into TensorFlow's ram:// filesystem,
never to disk, and answering exactly like the plaintext SavedModel run directly in TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal

from .serving import ServeProcess, infer_grpc, infer_http

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.importorskip("tritonclient.grpc")


def tensorflow() -> Any:
    """TensorFlow, imported by the first test that needs it, not at collection: the import takes seconds,
    and the fast tier collects this module only to deselect it."""
    if os.environ.get("CI"):
        import tensorflow as tf  # CI installs it (scripts/test.sh): a missing TensorFlow must fail there

        return tf
    return pytest.importorskip("tensorflow")

CONFIG = """name: "tf_cnn"
platform: "tensorflow_savedmodel"
max_batch_size: 4
input [ { name: "input" data_type: TYPE_FP32 dims: [ 16, 16, 3 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""


def saved_model(path: Path) -> None:
    tf = tensorflow()

    class Cnn(tf.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            rng = tf.random.Generator.from_seed(3)
            self.filters = tf.Variable(rng.normal([3, 3, 3, 8]))
            self.dense = tf.Variable(rng.normal([8, 10]))

        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="input")])
        def serve(self, x: Any) -> dict[str, Any]:
            h = tf.nn.relu(tf.nn.conv2d(x, self.filters, 1, "SAME"))
            return {"output": tf.matmul(tf.reduce_mean(h, axis=[1, 2]), self.dense)}

    model = Cnn()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    tmp = tmp_path_factory.mktemp("tf")
    identity = HpkeIdentity.generate(KEMS["x25519"])
    identity.save(tmp / "host.key")
    saved_model(tmp / "plain.savedmodel")
    version = tmp / "repo" / "tf_cnn" / "1"
    version.mkdir(parents=True)
    modelseal.seal(tmp / "plain.savedmodel", version / "model.savedmodel.sealed", [identity.recipient])
    (tmp / "repo" / "tf_cnn" / "config.pbtxt").write_text(CONFIG)
    import shutil  # the same model behind a config that disagrees with its signature (issue 14, item 12)

    shutil.copytree(tmp / "repo" / "tf_cnn", tmp / "repo" / "tf_mismatch")
    (tmp / "repo" / "tf_mismatch" / "config.pbtxt").write_text(
        CONFIG.replace("tf_cnn", "tf_mismatch").replace(
            "TYPE_FP32 dims: [ 16, 16, 3 ]", "TYPE_FP64 dims: [ 16, 16, 4 ]"
        )
    )
    scratch = tmp / "scratch"  # the server's HOME and TMPDIR: must stay empty
    scratch.mkdir()
    server = ServeProcess(tmp / "repo", tmp / "serve.log", extra=["-i", str(tmp / "host.key")],
                          env={"HOME": str(scratch), "TMPDIR": str(scratch)})  # fmt: skip
    try:
        yield {"server": server, "tmp": tmp, "scratch": scratch}
    finally:
        server.stop()


def test_sealed_saved_model_matches_plain_tensorflow(served: dict[str, Any]) -> None:
    tf = tensorflow()
    batch = np.random.default_rng(5).standard_normal((3, 16, 16, 3), dtype=np.float32)
    plain = tf.saved_model.load(str(served["tmp"] / "plain.savedmodel"))
    expected = plain.signatures["serving_default"](input=tf.constant(batch))["output"].numpy()
    server = served["server"]
    np.testing.assert_array_equal(infer_grpc(server.grpc_client(), "tf_cnn", batch), expected)
    np.testing.assert_array_equal(infer_http(server.http_client(), "tf_cnn", batch), expected)
    sealed_dir = served["tmp"] / "repo" / "tf_cnn" / "1" / "model.savedmodel.sealed"
    from modelseal.format.bundle import is_bundle

    members = [p for p in sealed_dir.rglob("*") if p.is_file()]
    assert members and all(is_bundle(p) for p in members), "the sealed directory holds only sealed files"
    # importing TensorFlow makes Keras write its settings file (~/.keras/keras.json), and matplotlib its font
    # cache where it is installed; nothing else appears
    settings = (".keras", ".cache", ".config", ".cache/matplotlib", ".config/matplotlib")
    written = {str(p.relative_to(served["scratch"])) for p in served["scratch"].rglob("*")}
    unexpected = {w for w in written if w not in settings and not w.startswith((".keras/", ".cache/matplotlib/"))}
    assert not unexpected, unexpected


def test_a_config_that_disagrees_with_the_signature_is_unavailable(served: dict[str, Any]) -> None:
    """ac0b701 loaded it as READY with the config's metadata and answered every request with a 500."""
    index = {m["name"]: m for m in served["server"].http_client().get_model_repository_index()}
    assert index["tf_mismatch"]["state"] == "UNAVAILABLE"
    reason = index["tf_mismatch"]["reason"]
    assert "input 'input' is FP64 in the config but FP32 in the model" in reason
    assert "has shape [-1, 16, 16, 4] in the config but [-1, 16, 16, 3] in the model" in reason
    assert index["tf_cnn"]["state"] == "READY"


def test_the_public_loader_opens_a_sealed_saved_model_from_memory(served: dict[str, Any]) -> None:
    """``modelseal.tensorflow.load_saved_model``: what the server runs, for programs of their own."""
    tf = tensorflow()
    import modelseal.tensorflow

    tmp = served["tmp"]
    batch = np.random.default_rng(6).standard_normal((2, 16, 16, 3), dtype=np.float32)
    plain = tf.saved_model.load(str(tmp / "plain.savedmodel")).signatures["serving_default"]
    sealed = modelseal.tensorflow.load_saved_model(tmp / "repo" / "tf_cnn" / "1" / "model.savedmodel.sealed",
                                                   identity=str(tmp / "host.key"))  # fmt: skip
    got = sealed.signatures["serving_default"](input=tf.constant(batch))["output"].numpy()
    np.testing.assert_array_equal(got, plain(input=tf.constant(batch))["output"].numpy())
    assert not tf.io.gfile.glob("ram://modelseal-*"), "the ram:// copy is removed once loaded"
