"""The end-to-end demo behind ``modelseal demo``: owner seals, key service releases, host infers.

It plays both sides on one machine, with real processes and real TLS on loopback:

1. The owner writes a small image classifier's weights as safetensors (its own plaintext), starts a
   key service (``modelseal keyserver``, SQLite, local master key), registers the model and seals the
   weights with the ``keyserver`` recipient (hidden header, publisher signature): the file carries
   only a key id.
2. The owner issues the host a client certificate and grants it the model.
3. The host runs ``modelseal agent``, which fetches the key over mTLS and keeps it in memory only; the
   host loads the sealed model through the agent, checks the signature, runs an inference and compares
   it with the plaintext model.
4. The owner revokes the grant; at its next lease renewal the agent drops the key and loads fail.

The inference server joins this demo when it lands (issue 5).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from modelseal.crypto.signing import Signer
from modelseal.errors import KeyReleaseError, UsageError
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


@contextmanager
def _process(args: list[str], log: Path, ready: Callable[[], bool], what: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m modelseal ARGS`` until the block ends; wait until ``ready()``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "modelseal", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UsageError(f"the demo's {what} did not start; its log: {log}\n{log.read_text()[-1500:]}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(workdir: Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    from safetensors.numpy import save_file

    import modelseal.numpy
    from modelseal import pki
    from modelseal.keyserver.client import AdminClient
    from modelseal.keyserver.config import init_state
    from modelseal.recipients.keyserver import KeyserverRecipient

    say = log or (lambda _m: None)
    workdir = workdir.resolve()
    owner, host = workdir / "owner", workdir / "host"
    owner.mkdir(parents=True, exist_ok=True)
    host.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    weights = _weights(rng)
    plain = owner / "classifier.safetensors"
    save_file(weights, str(plain), metadata={"format": "np"})
    say(f"owner: wrote the plaintext model {plain} ({plain.stat().st_size} bytes)")

    port = _free_port()
    state = owner / f"keyserver-{port}"
    info = init_state(state, listen=f"127.0.0.1:{port}")
    config = Path(info["config"])
    config.write_text(re.sub(r"renew_after_s = \d+", "renew_after_s = 1", config.read_text()))
    url, ca = f"https://127.0.0.1:{port}", info["ca"]
    token = Path(info["admin_token_file"]).read_text().strip()

    def service_up() -> bool:
        import httpx

        try:
            return httpx.get(f"{url}/v1/health", verify=pki.client_context(ca), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with _process(["keyserver", "run", "--config", str(config)], state / "keyserver.log", service_up, "key service"):
        say(f"owner: key service up on {url} (SQLite, local master key, TLS 1.3 with its own CA)")
        admin = AdminClient(url, token=token, ca=ca)
        admin.call("POST", "/v1/admin/models", {"model": "demo-classifier", "description": "modelseal demo"})
        signer = Signer.generate()
        sealed = host / "classifier.sealed.safetensors"
        t0 = time.perf_counter()
        recipient = KeyserverRecipient(url, "demo-classifier", token=token, ca=ca)
        seal(plain, sealed, [recipient], model_id="demo-classifier", hide_header=True, signer=signer)
        t1 = time.perf_counter()
        say(f"owner: sealed it (hidden header, signed by {signer.public[:20]}...); the key stays in the key service")

        cert, key = pki.issue(state / "pki", "demo-host", uris=["spiffe://demo.example/host/1"])
        grant = admin.call(
            "POST", "/v1/admin/grants", {"model": "demo-classifier", "identity": "spiffe://demo.example/host/1"}
        )
        say(f"owner: issued the host a client certificate and granted it ({grant['grant_id']})")

        sock = Path(tempfile.mkdtemp(prefix="modelseal-demo-")) / "agent.sock"  # short path: sun_path is 108 bytes
        agent_cfg = host / "agent.toml"
        agent_cfg.write_text(
            f'keyserver = "{url}"\nca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\nsocket = "{sock}"\n'
            f'lease_public_key = "{info["lease_public_key"]}"\nprefetch = false\n'
        )
        with _process(["agent", "run", "--config", str(agent_cfg)], host / "agent.log", sock.exists, "agent"):
            say(f"host:  agent running on {sock} (keys in locked, non-dumpable memory)")
            t2 = time.perf_counter()
            loaded = modelseal.numpy.load_file(sealed, identity=f"agent:{sock}", trusted_signers=[signer.public])
            t3 = time.perf_counter()
            say(f"host:  key released over mTLS; loaded {len(loaded)} tensors from memory in {1000 * (t3 - t2):.1f} ms")

            image = rng.standard_normal((3, 32, 32), dtype=np.float32)
            sealed_logits = _forward(loaded, image)
            plain_logits = _forward(weights, image)
            identical = bool(np.array_equal(sealed_logits, plain_logits))
            label = int(np.argmax(sealed_logits))
            say(f"host:  inference -> class {label}, logits {np.array2string(sealed_logits[:4], precision=3)}...")
            say(f"check: outputs identical to the plaintext model: {identical}")
            if not identical:
                raise AssertionError("sealed model output differs from the plaintext model")

            admin.call("POST", f"/v1/admin/grants/{grant['grant_id']}/revoke", {"reason": "demo: licence ended"})
            say("owner: revoked the grant")
            revoked = _wait_for_refusal(sealed, f"agent:{sock}")
            say(f"host:  next load refused: {revoked}")
        sock.parent.rmdir()
        admin.close()
    return {
        "sealed": str(sealed),
        "class": label,
        "logits": sealed_logits.tolist(),
        "identical_to_plain": identical,
        "seal_ms": 1000 * (t1 - t0),
        "load_ms": 1000 * (t3 - t2),
        "after_revocation": revoked,
    }


def _wait_for_refusal(sealed: Path, identity: str, timeout: float = 10) -> str:
    """Load until the agent, at its next renewal, has dropped the revoked key; return the error."""
    import modelseal.numpy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            modelseal.numpy.load_file(sealed, identity=identity)
        except KeyReleaseError as exc:
            return f"{exc.code}: {exc}"
        time.sleep(0.25)
    raise AssertionError("the revoked key was still served after the renewal interval")
