"""The committed test vectors, checked twice: through modelseal, and by an independent reader.

The independent reader below uses only ``cryptography``, ``json`` and ``struct`` and follows
docs/format.md step by step; it is what a second implementation would do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import modelseal
import modelseal.numpy

HERE = Path(__file__).parent / "vectors"
V = json.loads((HERE / "vectors.json").read_text())
KEY = HERE / "symmetric.key"


def b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def unwrap_symmetric(stanza: dict, artifact_id: bytes) -> bytes:  # type: ignore[type-arg]
    key = b64(KEY.read_text().strip().splitlines()[-1].split(":", 1)[1])
    kek = hkdf(key, b64(stanza["salt"]), b"modelseal/1 symmetric-wrap")
    return AESGCM(kek).decrypt(bytes(12), b64(stanza["ct"]), lp(b"modelseal/1 dek") + artifact_id)


def independent_safetensors(path: Path) -> dict[str, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    env = json.loads(header["__metadata__"]["modelseal"])
    protected_raw = b64(env["protected"])
    p = json.loads(protected_raw)
    aid = b64(p["artifact_id"])
    dek = unwrap_symmetric(env["recipients"][0], aid)
    assert dek.hex() == V["dek_hex"]
    mac = hmac.new(hkdf(dek, aid, b"modelseal/1 header-mac"), protected_raw, hashlib.sha256).digest()
    assert hmac.compare_digest(mac, b64(env["mac"]))
    if "index_ct" in p:
        index = json.loads(
            AESGCM(hkdf(dek, aid, b"modelseal/1 index")).decrypt(
                bytes(12), b64(p["index_ct"]), lp(b"modelseal/1 index") + aid
            )
        )
    else:
        index = p["index"]
    key = AESGCM(hkdf(dek, aid, b"modelseal/1 payload"))
    data = 8 + n
    tags = data + p["payload_size"]
    seg, tag_i, out = p["segment_size"], 0, {}
    for ordinal, e in enumerate(index["entries"]):
        begin, end = e["offsets"]
        count = max(1, -(-(end - begin) // seg))
        pieces = []
        for i in range(count):
            s, t = data + begin + i * seg, min(data + end, data + begin + (i + 1) * seg)
            aad = b"".join(
                [
                    lp(b"modelseal/1 segment"),
                    lp(p["model_id"].encode()),
                    lp(p["model_version"].encode()),
                    lp(e["name"].encode()),
                    struct.pack(">QB", i, int(i == count - 1)),
                ]
            )
            nonce = struct.pack(">IQ", ordinal, i)
            pieces.append(key.decrypt(nonce, raw[s:t] + raw[tags + 16 * tag_i : tags + 16 * tag_i + 16], aad))
            tag_i += 1
        out[e["name"]] = b"".join(pieces)
    assert tag_i == p["tag_count"] and len(raw) == tags + 16 * tag_i
    return out


def test_key_schedule() -> None:
    from modelseal.crypto import keys
    from modelseal.crypto.segments import aad, nonce

    dek, aid = bytes.fromhex(V["dek_hex"]), bytes.fromhex(V["artifact_id_hex"])
    assert hkdf(dek, aid, b"modelseal/1 payload").hex() == V["payload_key_hex"]
    assert keys.derive(dek, aid, keys.PURPOSE_HEADER_MAC).hex() == V["header_mac_key_hex"]
    assert keys.derive(dek, aid, keys.PURPOSE_INDEX).hex() == V["index_key_hex"]
    fs = V["first_segment"]
    assert nonce(fs["ordinal"], 0).hex() == fs["nonce_hex"]
    assert aad("vector-model", "7", fs["entry"], 0, True).hex() == fs["aad_hex"]


@pytest.mark.parametrize("name", ["public.sealed.safetensors", "hidden.sealed.safetensors"])
def test_safetensors_vectors(name: str) -> None:
    expected = V["files"][name]["tensors"]
    independent = independent_safetensors(HERE / name)
    ours = modelseal.numpy.load_file(HERE / name, identity=KEY)
    assert set(independent) == set(ours) == set(expected)
    for k, meta in expected.items():
        assert hashlib.sha256(independent[k]).hexdigest() == meta["sha256"]
        arr = ours[k]
        assert str(arr.dtype) == meta["dtype"] and list(arr.shape) == meta["shape"]
        assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == meta["sha256"]


def test_bundle_vector() -> None:
    meta = V["files"]["file.sealed.msb"]
    raw = (HERE / "file.sealed.msb").read_bytes()
    assert raw[:8] == b"MSEALBN1"
    data = modelseal.read_bytes(HERE / "file.sealed.msb", identity=KEY)
    assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]
