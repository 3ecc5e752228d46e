"""Test models shared by the serving tests and bench/serve.py: fixed-seed PyTorch classifiers, their
ONNX and TorchScript exports, and a Triton-style model repository entry (sealed or plain).

Benchmarks import this module (``bench/`` is on their path); tests import it as ``bench.models``, as they
import ``bench.fuzzlib``, so no benchmark imports ``tests/``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any


def small_cnn(seed: int = 0) -> Any:
    """A small image classifier (conv, batch norm, pooling, linear) with fixed random weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )  # fmt: skip
    return model.eval()


def resnet50(seed: int = 0) -> Any:
    """ResNet-50 (the torchvision architecture: bottleneck blocks 3-4-6-3, 25.6 M parameters) with fixed
    random weights; torchvision itself does not import beside the local torch build, and no hub is reachable."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + self.down(x))

    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def export_onnx(model: Any, shape: tuple[int, ...]) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, *shape),), buffer, dynamo=False, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )  # fmt: skip
    return buffer.getvalue()


def export_torchscript(model: Any, shape: tuple[int, ...]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, torch.randn(1, *shape)), buffer)
    return buffer.getvalue()


CONFIG = """name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "output" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
{batching}
"""


def add_model(repo: Path, name: str, platform: str, artifact: bytes, shape: tuple[int, ...], classes: int, *,
              recipients: list[str] | None, max_batch: int = 8, instances: int = 1,
              delay_us: int | None = None) -> Path:  # fmt: skip
    """REPO/NAME/config.pbtxt + REPO/NAME/1/model.{onnx,pt}[.sealed]; sealed when ``recipients`` are given."""
    import modelseal

    directory = repo / name / "1"
    directory.mkdir(parents=True)
    suffix = ".onnx" if platform == "onnxruntime_onnx" else ".pt"
    plain = directory / f"model{suffix}"
    plain.write_bytes(artifact)
    if recipients:
        modelseal.seal(plain, directory / f"model{suffix}.sealed", recipients, as_bundle=True)
        plain.unlink()
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}" if delay_us is not None else ""
    text = CONFIG.format(
        name=name,
        platform=platform,
        max_batch=max_batch,
        dims=", ".join(map(str, shape)),
        classes=classes,
        instances=instances,
        batching=batching,
    )
    (repo / name / "config.pbtxt").write_text(text)
    return directory
