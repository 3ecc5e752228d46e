"""Shared fixtures: identities, signers and small models built on the fly (nothing downloaded)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import modelseal
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .services import KeyServer

# tests/llm runs in its own environment (.venv-vllm, see scripts/test.sh); elsewhere vLLM is not installed.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["llm"]


@pytest.fixture
def renewing_keyserver(tmp_path: Path) -> Iterator[KeyServer]:
    """A key service (SQLite) whose leases renew every second, so a revocation shows within a test."""
    with KeyServer(tmp_path / "ks", None, leases={"lease_ttl_s": 4, "renew_after_s": 1}) as ks:
        yield ks


@pytest.fixture(scope="session")
def host() -> HpkeIdentity:
    return HpkeIdentity.generate(KEMS["x25519"])


@pytest.fixture(scope="session")
def other_host() -> HpkeIdentity:
    return HpkeIdentity.generate(KEMS["x25519"])


@pytest.fixture(scope="session")
def signer() -> modelseal.Signer:
    return modelseal.Signer.generate()


@pytest.fixture
def host_key(tmp_path: Path, host: HpkeIdentity) -> Path:
    p = tmp_path / "host.key"
    host.save(p)
    return p


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((300, 64)).astype(np.float32),
        "layer.0.weight": rng.standard_normal((64, 64)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(64).astype(np.float64),
        "counts": rng.integers(-1000, 1000, size=(7, 3), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(5,), dtype=np.uint8).astype(bool),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }


@pytest.fixture
def plain_file(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    p = tmp_path / "plain.safetensors"
    save_file(make_tensors(), str(p), metadata={"format": "np", "author": "tests"})
    return p
