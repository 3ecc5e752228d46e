"""Write the stanza-type vectors, a sealed-directory bundle and the failure vectors (run from the repository root).

    python tests/vectors/make_failures.py

What it writes, all listed in ``cases.json`` with the identity to use and the expected outcome:

* test keys ``x25519.key`` and ``mlkem768x25519.key``, from fixed seeds (test keys only: never seal
  anything real to them); the passphrase is in ``cases.json``;
* one valid sealed file per stanza type not covered by ``generate.py`` (``stanza-x25519``,
  ``stanza-mlkem768x25519``, ``stanza-scrypt``; the symmetric one is ``public.sealed.safetensors``) and
  ``dir.sealed.msb``, a bundle of a small directory tree sealed to two recipients;
* failure vectors, each a valid vector with one documented change: a byte flipped in the protected
  header, in a payload segment, in the tag region or in a recipient stanza's ciphertext, or the file
  cut short inside its header or payload. ``cases.json`` records each change as bytes at an offset
  (or the length cut to), so a reader of another implementation can check what differs.

The data key and artifact ids are fixed, but the recipient stanzas are not: HPKE draws a fresh
ephemeral key and the symmetric and scrypt stanzas a fresh salt on every run (``cryptography`` offers
no way to fix them). So regenerating rewrites every file this script owns with different bytes (and
new hashes in ``cases.json``); the tests read the committed bytes. The failure vectors are derived
deterministically from their base files, so their changes are reproducible for given bases. This
script never writes the files of ``generate.py`` (``public.sealed.safetensors``, ``file.sealed.msb``,
``symmetric.key``, ``vectors.json``); it only reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from modelseal.encoding import b64d, b64e
from modelseal.format import bundle
from modelseal.format import safetensors as sst
from modelseal.load.artifacts import open_artifact
from modelseal.recipients.hpke import MLKEM768X25519, X25519, HpkeIdentity
from modelseal.recipients.passphrase import MIN_LOG_N, Passphrase
from modelseal.recipients.symmetric import SymmetricKey

HERE = Path(__file__).parent
DEK = bytes(range(32))  # the data key of generate.py, so every vector shares one key schedule input
SEG = 4096
X25519_SECRET = bytes(range(32, 64))
MLKEM_SECRET = bytes(range(64, 160))  # 64-byte ML-KEM-768 seed, then the 32-byte X25519 private key
PASSPHRASE = "modelseal vector passphrase"
WRONG_PASSPHRASE = "not the vector passphrase"
SYMMETRIC = {"key_file": "symmetric.key"}
X25519_ID = {"key_file": "x25519.key"}
MLKEM_ID = {"key_file": "mlkem768x25519.key"}
PASS_ID = {"passphrase": PASSPHRASE}

# The bundled directory: relative path -> (content, permission bits); plus one empty directory.
TREE: dict[str, tuple[bytes, int]] = {
    "README.txt": (b"a sealed directory test vector\n", 0o644),
    "run.sh": (b"#!/bin/sh\necho sealed\n", 0o755),
    "weights/empty.bin": (b"", 0o640),
    "weights/model.bin": (bytes(i * 7 % 251 for i in range(6000)), 0o600),  # 2 segments
}
EMPTY_DIRS = ["logs"]

# The expected outcomes, per cause; each message is a stable part of modelseal's one-line error.
HEADER_MAC = ("AuthenticationError", "the header failed authentication", "header-mac")
TRUNCATED_PAYLOAD = ("FormatError", "is truncated: expected", "truncated")
NO_IDENTITY = ("NoMatchingIdentityError", "none of your identities", "no-matching-identity")
WRONG_PASS = ("NoMatchingIdentityError", "wrong passphrase", "no-matching-identity")


def artifact_id(name: str) -> bytes:
    """A fixed artifact id per vector (ids must differ between artifacts; random ones would not be fixed)."""
    return hashlib.sha256(b"modelseal vector " + name.encode()).digest()[:16]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def identity_arg(spec: dict[str, str]) -> Any:
    return Passphrase(spec["passphrase"]) if "passphrase" in spec else str(HERE / spec["key_file"])


def tensors() -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    return {
        "embed": (np.arange(40 * 64, dtype=np.float32) / 7).astype(np.float16).reshape(40, 64),  # 5120 bytes
        "scale": np.array([0.5, 1.0, 2.0], dtype=np.float32),
    }


def seal_stanza_vectors(x: HpkeIdentity, m: HpkeIdentity) -> dict[str, Any]:
    plain = save(tensors())
    meta = {
        k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": sha256(v.tobytes())} for k, v in tensors().items()
    }
    out: dict[str, Any] = {}
    for stanza, recipient, identity, hidden in (
        ("x25519", x.recipient, X25519_ID, False),
        ("mlkem768x25519", m.recipient, MLKEM_ID, True),
        ("scrypt", Passphrase(PASSPHRASE, log_n=MIN_LOG_N), PASS_ID, False),
    ):
        name = f"stanza-{stanza}.sealed.safetensors"
        aid = artifact_id(name)
        b = sst.EnvelopeBuilder("safetensors", "vector-model", "7", SEG, bytearray(DEK), aid)
        sst.seal_buffer(plain, HERE / name, [recipient], builder=b, hidden=hidden)
        out[name] = {
            "kind": "safetensors",
            "stanza": stanza,
            "hidden": hidden,
            "artifact_id_hex": aid.hex(),
            "identities": [identity],
            "tensors": meta,
        }
    return out


def seal_dir_bundle(sym: SymmetricKey, x: HpkeIdentity) -> dict[str, Any]:
    name = "dir.sealed.msb"
    aid = artifact_id(name)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, (data, mode) in TREE.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            os.chmod(root / rel, mode)
        for d in EMPTY_DIRS:
            (root / d).mkdir()
        b = bundle.EnvelopeBuilder("bundle", "vector-model", "7", SEG, bytearray(DEK), aid)
        bundle.seal_path(root, HERE / name, [sym, x.recipient], builder=b)
    return {
        name: {
            "kind": "bundle",
            "artifact_id_hex": aid.hex(),
            "identities": [SYMMETRIC, X25519_ID],  # the first stanza, and the second
            "root": "dir",
            "dirs": EMPTY_DIRS,
            "files": {rel: {"size": len(d), "mode": mode, "sha256": sha256(d)} for rel, (d, mode) in TREE.items()},
        }
    }


class Base:
    """A committed valid vector and where its parts lie (read through modelseal: this is the writer's side)."""

    def __init__(self, name: str, identity: dict[str, str]) -> None:
        self.name = name
        self.raw = (HERE / name).read_bytes()
        art = open_artifact(HERE / name, identity_arg(identity))
        try:
            self.envelope = art.envelope
            self.payload_offset = art.payload_offset
            self.payload_size = art.payload_size
            self.segments = {e.name: art.plan(e) for e in art.entries}
        finally:
            art.close()

    def header_length(self) -> int:
        """The container header's length field (``N``): bytes after the 8- or 16-byte prefix."""
        prefix = 16 if self.raw.startswith(bundle.MAGIC) else 8
        return int.from_bytes(self.raw[prefix - 8 : prefix], "little")

    def find(self, text: str) -> int:
        """Where the base64 text ``text`` (a header field's value) lies in the file; it occurs once."""
        at = self.raw.find(text.encode())
        assert at > 0 and self.raw.find(text.encode(), at + 1) < 0, "the field must occur exactly once"
        return at


def spliced(base: Base, at: int, old: bytes, new: bytes) -> tuple[bytes, dict[str, Any]]:
    """``base`` with ``old`` at ``at`` replaced by ``new`` (same length), and the change as recorded."""
    assert base.raw[at : at + len(old)] == old and len(old) == len(new) and old != new
    lo = next(i for i in range(len(old)) if old[i] != new[i])
    hi = max(i for i in range(len(old)) if old[i] != new[i]) + 1
    change = {"offset": at + lo, "old_hex": old[lo:hi].hex(), "new_hex": new[lo:hi].hex()}
    return base.raw[:at] + new + base.raw[at + len(old) :], change


def flip(base: Base, at: int) -> tuple[bytes, dict[str, Any]]:
    return spliced(base, at, base.raw[at : at + 1], bytes([base.raw[at] ^ 0x01]))


def header_flip(base: Base) -> tuple[bytes, dict[str, Any]]:
    """Flip the low bit of the last byte of ``model_id`` inside the protected header ``P``: still valid
    JSON with a valid id (``vector-model`` becomes ``vector-modem``), so only the MAC can catch it."""
    p = base.envelope.protected_raw
    i = p.index(b'"model_id":"vector-model"') + len(b'"model_id":"vector-model"') - 2
    flipped = p[:i] + bytes([p[i] ^ 0x01]) + p[i + 1 :]
    return spliced(base, base.find(b64e(p)), b64e(p).encode(), b64e(flipped).encode())


def stanza_flip(base: Base, index: int = 0) -> tuple[bytes, dict[str, Any]]:
    """Flip the low bit of byte -20 of stanza ``index``'s decoded ``ct``, inside its last 48 bytes (the
    AES-GCM sealed data key), leaving type, kid, salt and HPKE encapsulation intact: the stanza is still
    addressed to the identity. Re-encoded, it has the same length and is canonical base64url, so only the
    cryptography can object."""
    text = base.envelope.recipients[index]["ct"]
    ct = bytearray(b64d(text))
    ct[-20] ^= 0x01
    return spliced(base, base.find(text), text.encode(), b64e(bytes(ct)).encode())


def truncated(base: Base, length: int) -> tuple[bytes, dict[str, Any]]:
    assert 0 < length < len(base.raw)
    return base.raw[:length], {"truncate": length}


def case(
    name: str,
    base: Base | None,
    made: tuple[bytes, dict[str, Any]] | None,
    identity: dict[str, str],
    expect: tuple[str, str, str],
    about: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {"file": name, "identity": identity, "about": about}
    if base is not None and made is not None:
        data, change = made
        (HERE / name).write_bytes(data)
        out.update({"from": base.name, "change": change})
    out["error"], out["message"], out["reason"] = expect
    return out


def failure_cases() -> list[dict[str, Any]]:
    pub = Base("public.sealed.safetensors", SYMMETRIC)
    one = Base("file.sealed.msb", SYMMETRIC)
    tree = Base("dir.sealed.msb", X25519_ID)
    stx = Base("stanza-x25519.sealed.safetensors", X25519_ID)
    stm = Base("stanza-mlkem768x25519.sealed.safetensors", MLKEM_ID)
    sts = Base("stanza-scrypt.sealed.safetensors", PASS_ID)
    weight1 = pub.segments["weight"][1]
    bias_tag = pub.segments["bias"][0].tag_index
    model1 = tree.segments["weights/model.bin"][1]
    cut_header = "FormatError", "runs past the end of the file (truncated?)", "truncated"
    cut_bundle_header = "FormatError", "is truncated inside its header", "truncated"
    stanza_x = "AuthenticationError", "x25519 data-key stanza addressed to this identity does not decrypt", "stanza"
    stanza_m = (
        "AuthenticationError",
        "mlkem768x25519 data-key stanza addressed to this identity does not decrypt",
        "stanza",
    )
    stanza_sym = "AuthenticationError", "symmetric data-key stanza for this key does not decrypt", "stanza"
    stanza_scrypt = "NoMatchingIdentityError", "wrong passphrase (or the passphrase stanza was tampered with)"
    return [
        case(
            "fail-header-mac.sealed.safetensors", pub, header_flip(pub), SYMMETRIC, HEADER_MAC,
            "one bit of the protected header flipped (model_id vector-model -> vector-modem)",
        ),
        case(
            "fail-header-mac.sealed.msb", one, header_flip(one), SYMMETRIC, HEADER_MAC,
            "one bit of the protected header flipped (model_id vector-model -> vector-modem)",
        ),
        case(
            "fail-payload.sealed.safetensors", pub, flip(pub, pub.payload_offset + weight1.offset), SYMMETRIC,
            ("AuthenticationError", "entry 'weight' segment 1 failed authentication", "payload"),
            "one bit flipped in the first ciphertext byte of segment 1 of tensor 'weight'",
        ),
        case(
            "fail-tag.sealed.safetensors", pub, flip(pub, pub.payload_offset + pub.payload_size + 16 * bias_tag),
            SYMMETRIC,
            ("AuthenticationError", "entry 'bias' segment 0 failed authentication", "payload"),
            "one bit flipped in the GCM tag of tensor 'bias' (tag region)",
        ),
        case(
            "fail-payload.sealed.msb", tree, flip(tree, tree.payload_offset + model1.offset + 100), X25519_ID,
            ("AuthenticationError", "entry 'weights/model.bin' segment 1 failed authentication", "payload"),
            "one bit flipped in segment 1 of file 'weights/model.bin'",
        ),
        case(
            "public.sealed.safetensors", None, None, X25519_ID, NO_IDENTITY,
            "a valid file sealed to a symmetric key, opened with an x25519 identity",
        ),
        case(
            "dir.sealed.msb", None, None, MLKEM_ID, NO_IDENTITY,
            "a valid bundle sealed to a symmetric key and an x25519 key, opened with an ML-KEM identity",
        ),
        case(
            "stanza-scrypt.sealed.safetensors", None, None, {"passphrase": WRONG_PASSPHRASE}, WRONG_PASS,
            "a valid file sealed to a passphrase, opened with another passphrase",
        ),
        case(
            "fail-truncated-header.sealed.safetensors", pub, truncated(pub, 8 + pub.header_length() // 2),
            SYMMETRIC, cut_header, "cut in the middle of the safetensors header",
        ),
        case(
            "fail-truncated-payload.sealed.safetensors", pub,
            truncated(pub, pub.payload_offset + pub.payload_size // 2), SYMMETRIC, TRUNCATED_PAYLOAD,
            "cut in the middle of the payload",
        ),
        case(
            "fail-truncated-header.sealed.msb", one, truncated(one, 16 + one.header_length() // 2), SYMMETRIC,
            cut_bundle_header, "cut in the middle of the bundle header",
        ),
        case(
            "fail-truncated-payload.sealed.msb", one, truncated(one, one.payload_offset + one.payload_size // 2),
            SYMMETRIC, TRUNCATED_PAYLOAD, "cut in the middle of the payload",
        ),
        case(
            "fail-stanza-x25519.sealed.safetensors", stx, stanza_flip(stx), X25519_ID, stanza_x,
            "one bit flipped in the sealed data key of the x25519 stanza (kid and encapsulation intact)",
        ),
        case(
            "fail-stanza-mlkem768x25519.sealed.safetensors", stm, stanza_flip(stm), MLKEM_ID, stanza_m,
            "one bit flipped in the sealed data key of the mlkem768x25519 stanza (kid and encapsulation intact)",
        ),
        case(
            "fail-stanza-scrypt.sealed.safetensors", sts, stanza_flip(sts), PASS_ID,
            (*stanza_scrypt, "no-matching-identity"),
            "one bit flipped in the scrypt stanza's ct: indistinguishable from a wrong passphrase",
        ),
        case(
            "fail-stanza-symmetric.sealed.safetensors", pub, stanza_flip(pub), SYMMETRIC, stanza_sym,
            "one bit flipped in the symmetric stanza's ct (kid and salt intact)",
        ),
    ]  # fmt: skip


def main() -> None:
    sym = SymmetricKey.load(HERE / "symmetric.key")  # generate.py's key, read, never rewritten
    x = HpkeIdentity(X25519, X25519_SECRET)
    m = HpkeIdentity(MLKEM768X25519, MLKEM_SECRET)
    x.save(HERE / "x25519.key", force=True)
    m.save(HERE / "mlkem768x25519.key", force=True)
    old = json.loads((HERE / "vectors.json").read_text())
    valid = {
        "public.sealed.safetensors": {  # generate.py's, listed here as the symmetric stanza's valid vector
            "kind": "safetensors",
            "stanza": "symmetric",
            "hidden": False,
            "artifact_id_hex": old["artifact_id_hex"],
            "identities": [SYMMETRIC],
            "tensors": old["files"]["public.sealed.safetensors"]["tensors"],
        },
        **seal_stanza_vectors(x, m),
        **seal_dir_bundle(sym, x),
    }
    failures = failure_cases()
    for name, entry in valid.items():
        entry["sha256"] = sha256((HERE / name).read_bytes())
    for c in failures:
        c["sha256"] = sha256((HERE / c["file"]).read_bytes())
    out = {
        "about": "made by make_failures.py; identities name key files in this folder or give a passphrase",
        "dek_hex": DEK.hex(),
        "passphrase": PASSPHRASE,
        "valid": valid,
        "failures": failures,
    }
    (HERE / "cases.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
