"""The end-to-end demo behind ``modelseal demo``: owner seals, host loads from memory and infers.

It plays both sides on one machine. The owner's side writes a small image classifier's weights as
safetensors (the owner's own plaintext, as at any model owner's site), makes a host identity, and seals
the weights to it with a publisher signature. The host side loads the sealed weights with only its
identity, checks the signature, runs an inference and compares it with the plaintext model.
The key service and the inference server join this demo when they land (issues 3 and 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelseal.crypto.signing import Signer
from modelseal.recipients.hpke import X25519, HpkeIdentity
from modelseal.sealing import seal


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.standard_normal((16, 3, 3, 3), dtype=np.float32) * 0.2,
        "conv.bias": rng.standard_normal(16, dtype=np.float32) * 0.1,
        "fc.weight": rng.standard_normal((10, 16), dtype=np.float32) * 0.2,
        "fc.bias": rng.standard_normal(10, dtype=np.float32) * 0.1,
    }


def _forward(w: dict[str, Any], image: np.ndarray) -> np.ndarray:
    """A tiny conv -> ReLU -> global pool -> linear network in numpy (so the demo needs no framework)."""
    k = np.lib.stride_tricks.sliding_window_view(image, (3, 3), axis=(1, 2))  # (3, H-2, W-2, 3, 3)
    conv = np.einsum("chwij,ocij->ohw", k, np.asarray(w["conv.weight"])) + np.asarray(w["conv.bias"])[:, None, None]
    pooled = np.maximum(conv, 0).mean(axis=(1, 2))
    logits: np.ndarray = np.asarray(w["fc.weight"]) @ pooled + np.asarray(w["fc.bias"])
    return logits


def run_demo(workdir: Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    from safetensors.numpy import save_file

    import modelseal.numpy

    say = log or (lambda _m: None)
    owner, host = workdir / "owner", workdir / "host"
    owner.mkdir(parents=True, exist_ok=True)
    host.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    weights = _weights(rng)
    plain = owner / "classifier.safetensors"
    save_file(weights, str(plain), metadata={"format": "np"})
    say(f"owner: wrote the plaintext model {plain} ({plain.stat().st_size} bytes)")

    ident = HpkeIdentity.generate(X25519)
    ident.save(host / "host.key", force=True)
    signer = Signer.generate()
    say(f"host:  made identity {host / 'host.key'}; recipient {ident.recipient.describe()[:24]}...")

    sealed = host / "classifier.sealed.safetensors"
    t0 = time.perf_counter()
    seal(
        plain, sealed, [ident.recipient], model_id="demo-classifier", model_version="1", hide_header=True, signer=signer
    )
    say(f"owner: sealed it to the host, hidden header, signed by {signer.public[:20]}... -> {sealed}")

    t1 = time.perf_counter()
    loaded = modelseal.numpy.load_file(sealed, identity=host / "host.key", trusted_signers=[signer.public])
    t2 = time.perf_counter()
    say(f"host:  loaded {len(loaded)} tensors from memory in {1000 * (t2 - t1):.1f} ms (signature checked)")

    image = rng.standard_normal((3, 32, 32), dtype=np.float32)
    sealed_logits = _forward(loaded, image)
    plain_logits = _forward(weights, image)
    identical = bool(np.array_equal(sealed_logits, plain_logits))
    label = int(np.argmax(sealed_logits))
    say(f"host:  inference -> class {label}, logits {np.array2string(sealed_logits[:4], precision=3)}...")
    say(f"check: outputs identical to the plaintext model: {identical}")
    if not identical:
        raise AssertionError("sealed model output differs from the plaintext model")
    return {
        "sealed": str(sealed),
        "class": label,
        "logits": sealed_logits.tolist(),
        "identical_to_plain": identical,
        "seal_ms": 1000 * (t1 - t0),
        "load_ms": 1000 * (t2 - t1),
    }
