"""Fast checks of the repository's Triton behaviours without a server: config completion from what a model
declares, version policies, the override of a load request, and the classification extension."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelseal.serve.autocomplete import complete, effective_config
from modelseal.serve.errors import ServeError
from modelseal.serve.infer import classify
from modelseal.serve.repository import ConfigError, ModelSpec, TensorSpec, VersionPolicy, parse_config

BATCHING = ({"x": ("FP32", (None, 4))}, {"y": ("FP32", (None, 3))})


def spec(**changes: object) -> ModelSpec:
    base = ModelSpec("m", Path("/nowhere/m"), "onnxruntime_onnx", 0, (), ())
    return ModelSpec(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_a_model_with_a_variable_first_dimension_everywhere_batches_with_the_default() -> None:
    done = complete(spec(), BATCHING, 4)
    assert done.max_batch_size == 4
    assert done.inputs == (TensorSpec("x", "FP32", (4,)),) and done.outputs == (TensorSpec("y", "FP32", (3,)),)
    assert complete(spec(), BATCHING, 0).inputs == (TensorSpec("x", "FP32", (-1, 4)),)  # 0: never batch


def test_a_fixed_first_dimension_or_a_declared_tensor_means_no_batching_guess() -> None:
    fixed = ({"x": ("FP32", (2, 4))}, {"y": ("FP32", (None, 3))})
    assert complete(spec(), fixed, 4).max_batch_size == 0
    declared = spec(outputs=(TensorSpec("y", "FP32", (-1, 3)),))
    done = complete(declared, BATCHING, 4)  # the config said something: only what it left out is filled in
    assert done.max_batch_size == 0 and done.outputs == declared.outputs
    assert done.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    kept = complete(spec(max_batch_size=8), BATCHING, 4)
    assert kept.max_batch_size == 8 and kept.inputs[0].dims == (4,)


@pytest.mark.parametrize(
    ("found", "why"),
    [((None, None), "no signature"), (({}, {}), "it declares no inputs"),
     (({"x": (None, (None, 4))}, {}), "input 'x' has an unknown data type"),
     (({"x": ("FP32", None)}, {}), "input 'x' has an unknown shape")],
)  # fmt: skip
def test_a_model_that_cannot_tell_is_a_config_error_naming_the_fix(found: tuple, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=rf"declares no inputs and the model cannot tell them \({why}\)"):
        complete(spec(), found, 4)


def test_effective_config_uses_tritons_names() -> None:
    done = complete(spec(), BATCHING, 4)
    config = effective_config(done)
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and "dynamic_batching" not in config
    strings = effective_config(spec(inputs=(TensorSpec("s", "BYTES", (-1,)),)), device="cuda")
    assert strings["input"][0]["data_type"] == "TYPE_STRING" and strings["instance_group"][0]["kind"] == "KIND_GPU"


def test_version_policies_choose_from_the_directories_found() -> None:
    found = [1, 2, 3, 5]
    assert VersionPolicy().choose(found) == [5]
    assert VersionPolicy("latest", latest=2).choose(found) == [3, 5]
    assert VersionPolicy("all").choose(found) == found
    assert VersionPolicy("specific", specific=(1, 4, 5)).choose(found) == [1, 5]


def test_configs_from_a_load_request_are_checked_like_files(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"")
    assert parse_config(tmp_path / "m").platform == "onnxruntime_onnx"  # no config: told from the file
    override = parse_config(tmp_path / "m", '{"version_policy": {"all": {}}, "max_batch_size": 2}')
    assert override.version_policy.kind == "all" and override.max_batch_size == 2
    for text, why in [
        ('{"version_policy": {"latest": {"num_versions": 99}}}', "num_versions must be 1..16"),
        ('{"version_policy": {"specific": {"versions": [0]}}}', "version numbers >= 1"),
        # the review's attacks: a load request loading native code from anywhere (default_model_filename),
        # importing any module and calling it (a state dict's entry_point), reading any file as labels
        ('{"backend": "tvm", "default_model_filename": "/tmp/evil"}', "may not set default_model_filename, backend"),
        ('{"defaultModelFilename": "../../outside/secret.onnx"}', "may not set default_model_filename"),
        ('{"parameters": {"entry_point": {"string_value": "os:abort"}}}', "may not set parameters"),
        ('{"platform": "tensorflow_savedmodel"}', "may not set platform"),
        ('{"output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3], "label_filename": "model.py"}]}',
         "may not set label_filename"),
        ('{"name": "other"}', "differs from the model directory"),
        ('[' * 100, "load request config"),
        ('{"a": 1, "a": 2}', "load request config"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            parse_config(tmp_path / "m", text)
    with pytest.raises(ConfigError, match="--strict-config requires one"):
        parse_config(tmp_path / "m", strict=True)
    for name in ("../../outside/secret.onnx", "/etc/passwd", ".hidden"):  # the operator's files too
        (tmp_path / "m" / "config.json").write_text(json.dumps({"default_model_filename": name}))
        with pytest.raises(ConfigError, match="default_model_filename must name a file in the version directory"):
            parse_config(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"output": [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [3], "label_filename": "../labels.txt"}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="label_filename must name a file in"):
        parse_config(tmp_path / "m")


def test_an_override_changes_how_the_model_is_served_and_keeps_what_the_operator_set(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.pt").write_bytes(b"")
    (tmp_path / "m" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 8\ndefault_model_filename: "model.pt"\n'
        'parameters { key: "entry_point" value: { string_value: "arch:build" } }\n'
    )
    merged = parse_config(tmp_path / "m", '{"max_batch_size": 2, "version_policy": {"all": {}}}')
    assert merged.max_batch_size == 2 and merged.version_policy.kind == "all"
    assert merged.platform == "pytorch_libtorch" and merged.default_model_filename == "model.pt"
    assert merged.parameters == {"entry_point": "arch:build"}
    # the second review: a load request raised sizes (instances x versions of decrypted weights, batches
    # whose classification holds the GIL for tens of seconds); it may only lower them
    raised = {'{"max_batch_size": 2147483647}': "may lower max_batch_size, not raise it above the repository's 8",
              '{"instance_group": [{"count": 64}]}': r"may not ask for more instances \(64\) than the repository's"}
    for text, why in raised.items():
        with pytest.raises(ConfigError, match=why):
            parse_config(tmp_path / "m", text)
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 100000\n")
    with pytest.raises(ConfigError, match="max_batch_size is at most 65536"):
        parse_config(tmp_path / "m")


def test_version_numbers_are_ascii_digits() -> None:
    from modelseal.serve.repository import version_number

    assert [version_number(t) for t in ("1", "007", "²", "١", "-1", "1.0", "9" * 19, "")] == [
        1, 7, None, None, None, None, None, None]  # fmt: skip


def test_classification_answers_value_index_and_label_largest_first() -> None:
    logits = np.array([[0.5, 3.0, -1.0], [9.0, 1.0, 2.0]], np.float32)
    top = classify("y", logits, 2, ["zero", "", "two"], batching=True)
    assert top.tolist() == [[b"3.000000:1", b"0.500000:0:zero"], [b"9.000000:0:zero", b"2.000000:2:two"]]
    assert classify("y", logits[0], 9, [], batching=False).tolist() == [b"3.000000:1", b"0.500000:0",
                                                                         b"-1.000000:2"]  # fmt: skip
    with pytest.raises(ServeError, match="classification needs a numeric output"):
        classify("y", np.array([b"a"], dtype=object), 1, [], batching=False)
