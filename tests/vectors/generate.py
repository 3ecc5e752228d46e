"""Regenerate the test vectors in this folder (run from the repository root).

    python tests/vectors/generate.py

Every vector uses a fixed data key and artifact id (listed in ``vectors.json``) so that a second
implementation can check its key schedule, nonces, AAD and tags against ours; the symmetric-key
stanza's salt is random, so regenerating changes the files but not the derived values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from modelseal.crypto import keys
from modelseal.crypto.segments import aad, nonce
from modelseal.format import bundle
from modelseal.format import safetensors as sst
from modelseal.recipients.symmetric import SymmetricKey

HERE = Path(__file__).parent
DEK = bytes(range(32))
ARTIFACT_ID = bytes(range(100, 116))
KEY = SymmetricKey(bytes(range(200, 232)))
SEG = 4096


def main() -> None:
    KEY.save(HERE / "symmetric.key", force=True)
    tensors = {
        "weight": np.arange(2048, dtype=np.float32).reshape(32, 64),  # 8192 bytes: 2 segments
        "bias": np.arange(5, dtype=np.int16),
        "empty": np.zeros((0,), dtype=np.uint8),
    }
    plain = save(tensors, metadata={"format": "np"})
    out: dict[str, object] = {
        "dek_hex": DEK.hex(),
        "artifact_id_hex": ARTIFACT_ID.hex(),
        "segment_size": SEG,
        "payload_key_hex": keys.derive(DEK, ARTIFACT_ID, keys.PURPOSE_PAYLOAD).hex(),
        "header_mac_key_hex": keys.derive(DEK, ARTIFACT_ID, keys.PURPOSE_HEADER_MAC).hex(),
        "index_key_hex": keys.derive(DEK, ARTIFACT_ID, keys.PURPOSE_INDEX).hex(),
        "first_segment": {
            "entry": "bias",
            "ordinal": 0,
            "nonce_hex": nonce(0, 0).hex(),
            "aad_hex": aad("vector-model", "7", "bias", 0, True).hex(),
        },
        "files": {},
    }
    files: dict[str, object] = {}
    for name, hidden in (("public.sealed.safetensors", False), ("hidden.sealed.safetensors", True)):
        b = sst.EnvelopeBuilder("safetensors", "vector-model", "7", SEG, bytearray(DEK), ARTIFACT_ID)
        sst.seal_buffer(plain, HERE / name, [KEY], builder=b, hidden=hidden)
        files[name] = {
            "kind": "safetensors",
            "hidden": hidden,
            "tensors": {
                k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
                for k, v in tensors.items()
            },
        }
    src = HERE / "_bundle_src.txt"
    src.write_bytes(b"modelseal test vector\n" * 300)  # 6600 bytes: 2 segments
    b = bundle.EnvelopeBuilder("bundle", "vector-model", "7", SEG, bytearray(DEK), ARTIFACT_ID)
    bundle.seal_path(src, HERE / "file.sealed.msb", [KEY], builder=b)
    files["file.sealed.msb"] = {
        "kind": "bundle",
        "name": "_bundle_src.txt",
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "size": src.stat().st_size,
    }
    src.unlink()
    out["files"] = files
    (HERE / "vectors.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
