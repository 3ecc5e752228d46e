"""The committed test vectors, checked twice: through modelseal, and by an independent reader.

The independent reader below uses only ``cryptography``, ``json``, ``struct`` and the standard
library, and follows docs/format.md step by step (section 8, "Reading, in order"); it is what a second
implementation would do. It reads sealed safetensors and sealed bundles, and says which step refused a
file. ``vectors/vectors.json`` lists the positive vectors of ``vectors/generate.py``;
``vectors/cases.json`` (made by ``vectors/make_failures.py``) lists one valid vector per stanza type, a
sealed directory tree, and failure vectors with the error modelseal must raise and the step the
independent reader must refuse at.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

import modelseal
import modelseal.numpy
from modelseal import errors

HERE = Path(__file__).parent / "vectors"
V = json.loads((HERE / "vectors.json").read_text())
CASES = json.loads((HERE / "cases.json").read_text())
KEY = HERE / "symmetric.key"
SYMMETRIC = {"key_file": "symmetric.key"}

# ------------------------------------------------------------------------------- the independent reader


class RefusedError(Exception):
    """The independent reader refuses a file; ``reason`` names the step that failed.

    ``truncated``: the file is shorter than its header says; ``no-matching-identity``: no stanza yields
    the data key; ``stanza``: a stanza addressed to the identity (its ``kid`` matches) does not decrypt;
    ``header-mac``: the MAC over the protected header fails; ``index``: the hidden index fails;
    ``payload``: a segment's tag fails; ``format``: anything else malformed.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


@dataclass
class Key:
    """An identity for the independent reader: a passphrase, or a key file's label and secret bytes."""

    label: str
    secret: bytes


def read_key(spec: dict[str, str]) -> Key:
    """A manifest identity: ``{"passphrase": ...}`` or ``{"key_file": ...}``, a file of ``LABEL:B64`` lines."""
    if "passphrase" in spec:
        return Key("passphrase", spec["passphrase"].encode())
    for line in (HERE / spec["key_file"]).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            label, _, value = line.strip().partition(":")
            return Key(label, b64(value))
    raise AssertionError(f"no key in {spec}")


_HPKE = {"MODELSEAL-IDENTITY-X25519": "x25519", "MODELSEAL-IDENTITY-MLKEM768X25519": "mlkem768x25519"}


def _hpke_key(key: Key) -> tuple[Any, bytes, hpke.KEM]:
    """(private key, public key bytes for the kid, KEM): the hybrid secret is the 64-byte ML-KEM-768
    seed followed by the X25519 private key; its public key is the encapsulation key, then X25519's."""
    if key.label == "MODELSEAL-IDENTITY-X25519":
        xk = x25519.X25519PrivateKey.from_private_bytes(key.secret)
        return xk, xk.public_key().public_bytes_raw(), hpke.KEM.X25519
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(key.secret[:64])
    xk = x25519.X25519PrivateKey.from_private_bytes(key.secret[64:])
    public = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
    return hpke.MLKEM768X25519PrivateKey(mk, xk), public, hpke.KEM.MLKEM768_X25519


def unwrap(stanzas: list[dict[str, Any]], key: Key, artifact_id: bytes) -> bytes:
    """Section 4, "Recipient stanzas", and section 8 step 2: the data key from the first stanza the key accepts."""
    context = lp(b"modelseal/1 dek") + artifact_id
    for s in stanzas:
        if key.label == "passphrase" and s["type"] == "scrypt":
            kek = Scrypt(b64(s["salt"]), 32, 2 ** s["log_n"], 8, 1).derive(key.secret)
            try:
                return AESGCM(kek).decrypt(bytes(12), b64(s["ct"]), context)
            except InvalidTag:
                continue  # no kid: a wrong passphrase and a damaged stanza look the same
        elif key.label == "MODELSEAL-SYMMETRIC-KEY" and s["type"] == "symmetric":
            if b64(s["kid"]) != hkdf(key.secret, None, b"modelseal/1 symmetric-kid")[:8]:
                continue
            kek = hkdf(key.secret, b64(s["salt"]), b"modelseal/1 symmetric-wrap")
            try:
                return AESGCM(kek).decrypt(bytes(12), b64(s["ct"]), context)
            except InvalidTag:
                raise RefusedError("stanza", "the symmetric stanza for this key does not decrypt") from None
        elif _HPKE.get(key.label) == s["type"]:
            private, public, kem = _hpke_key(key)
            if b64(s["kid"]) != hashlib.sha256(b"modelseal/1 kid" + public).digest()[:8]:
                continue
            suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
            try:
                return suite.decrypt(b64(s["ct"]), private, info=context)
            except (InvalidTag, ValueError):
                raise RefusedError("stanza", f"the {s['type']} stanza for this key does not decrypt") from None
    raise RefusedError("no-matching-identity", "no stanza yields the data key")


@dataclass
class Opened:
    """What the independent reader read: the data key, the protected header and index, each entry's bytes."""

    dek: bytes
    protected: dict[str, Any]
    index: dict[str, Any]
    contents: dict[str, bytes]
    listing: dict[str, Any] | None  # the plain safetensors header; None for a bundle


def container(raw: bytes) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """Sections 5 and 6: (envelope, payload offset, plain safetensors header or None)."""
    bundle = raw[:8] == b"MSEALBN1"
    prefix = 16 if bundle else 8
    if len(raw) < prefix:
        raise RefusedError("truncated", "shorter than the length field")
    (n,) = struct.unpack("<Q", raw[prefix - 8 : prefix])
    if n > 104_857_600:
        raise RefusedError("format", "header over 100 MiB")
    if prefix + n > len(raw):
        raise RefusedError("truncated", "the header runs past the end of the file")
    if bundle:
        return json.loads(raw[16 : 16 + n]), 16 + n, None  # space padding is JSON whitespace
    listing = json.loads(raw[8 : 8 + n])
    return json.loads(listing["__metadata__"]["modelseal"]), 8 + n, listing


def independent_read(path: Path, key: Key) -> Opened:
    """Section 8, "Reading, in order", for either container kind."""
    raw = path.read_bytes()
    env, data, listing = container(raw)
    protected_raw = b64(env["protected"])
    p = json.loads(protected_raw)
    if p["format"] != "modelseal/1" or p["kind"] != ("safetensors" if listing is not None else "bundle"):
        raise RefusedError("format", "wrong format or kind")
    tags = data + p["payload_size"]
    if len(raw) != tags + 16 * p["tag_count"]:
        raise RefusedError("truncated" if len(raw) < tags + 16 * p["tag_count"] else "format", "wrong file length")
    aid = b64(p["artifact_id"])
    dek = unwrap(env["recipients"], key, aid)
    mac = hmac.new(hkdf(dek, aid, b"modelseal/1 header-mac"), protected_raw, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, b64(env["mac"])):
        raise RefusedError("header-mac", "the MAC over the protected header does not match")
    if "index_ct" in p:
        try:
            index = json.loads(
                AESGCM(hkdf(dek, aid, b"modelseal/1 index")).decrypt(
                    bytes(12), b64(p["index_ct"]), lp(b"modelseal/1 index") + aid
                )
            )
        except InvalidTag:
            raise RefusedError("index", "the hidden index does not decrypt") from None
    elif listing is None:
        raise RefusedError("format", "a sealed bundle must hide its index")
    else:
        index = p["index"]
    payload_key = AESGCM(hkdf(dek, aid, b"modelseal/1 payload"))
    seg, tag_i, pos, out = p["segment_size"], 0, 0, {}
    for ordinal, e in enumerate(index["entries"]):
        begin, end = e["offsets"]
        if begin != pos:
            raise RefusedError("format", "entries are not contiguous")
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
            tag = raw[tags + 16 * tag_i : tags + 16 * tag_i + 16]
            try:
                pieces.append(payload_key.decrypt(nonce, raw[s:t] + tag, aad))
            except InvalidTag:
                raise RefusedError("payload", f"segment {i} of {e['name']!r} fails its tag") from None
            tag_i += 1
        out[e["name"]] = b"".join(pieces)
        pos = end
    if tag_i != p["tag_count"] or pos != p["payload_size"]:
        raise RefusedError("format", "the index does not cover the payload and tags")
    return Opened(dek, p, index, out, listing)


def _safe_path(name: str) -> bool:
    """Section 8, "Bundle manifest": not empty, not absolute, no empty, ``.`` or ``..`` component, no NUL."""
    return (
        bool(name)
        and not name.startswith("/")
        and "\0" not in name
        and all(c not in ("", ".", "..") for c in name.split("/"))
    )


def independent_bundle(path: Path, key: Key) -> tuple[Opened, dict[str, tuple[int, bytes]]]:
    """Section 6 and the bundle manifest rules: the opened bundle and {relative path: (mode, content)}."""
    opened = independent_read(path, key)
    index = opened.index
    if opened.listing is not None or "index_ct" not in opened.protected:
        raise RefusedError("format", "not a sealed bundle with a hidden index")
    names, dirs = [e["name"] for e in index["entries"]], index.get("dirs", [])
    if not all(_safe_path(n) for n in names + dirs):
        raise RefusedError("format", "unsafe path in the manifest")
    for n in names + dirs:
        parents = {"/".join(n.split("/")[:k]) for k in range(1, n.count("/") + 1)}
        if parents & set(names) or (n in dirs and n in names):
            raise RefusedError("format", f"{n!r} collides with a file")
    if index["root"] not in ("file", "dir") or (index["root"] == "file" and (len(names) != 1 or dirs)):
        raise RefusedError("format", "bad root")
    files = {}
    for e in index["entries"]:
        if not 0 <= e["mode"] <= 0o7777:
            raise RefusedError("format", "mode out of range")
        files[e["name"]] = (e["mode"], opened.contents[e["name"]])
    return opened, files


# ------------------------------------------------------------------------------------ positive vectors


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


def modelseal_identity(spec: dict[str, str]) -> Any:
    """A manifest identity as modelseal takes it: a key-file path, or a Passphrase."""
    return modelseal.Passphrase(spec["passphrase"]) if "passphrase" in spec else str(HERE / spec["key_file"])


def check_tensors(path: Path, identity: dict[str, str], expected: dict[str, Any]) -> Opened:
    """The independent reader and modelseal both yield exactly the expected tensors."""
    independent = independent_read(path, read_key(identity))
    assert independent.dek.hex() == V["dek_hex"]
    ours = modelseal.numpy.load_file(path, identity=modelseal_identity(identity))
    assert set(independent.contents) == set(ours) == set(expected)
    for k, meta in expected.items():
        assert hashlib.sha256(independent.contents[k]).hexdigest() == meta["sha256"]
        arr = ours[k]
        assert str(arr.dtype) == meta["dtype"] and list(arr.shape) == meta["shape"]
        assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == meta["sha256"]
    return independent


@pytest.mark.parametrize("name", ["public.sealed.safetensors", "hidden.sealed.safetensors"])
def test_safetensors_vectors(name: str) -> None:
    check_tensors(HERE / name, SYMMETRIC, V["files"][name]["tensors"])


def test_bundle_vector() -> None:
    meta = V["files"]["file.sealed.msb"]
    raw = (HERE / "file.sealed.msb").read_bytes()
    assert raw[:8] == b"MSEALBN1"
    opened, files = independent_bundle(HERE / "file.sealed.msb", read_key(SYMMETRIC))
    assert opened.dek.hex() == V["dek_hex"] and opened.index["root"] == "file" and list(files) == [meta["name"]]
    assert hashlib.sha256(files[meta["name"]][1]).hexdigest() == meta["sha256"]
    data = modelseal.read_bytes(HERE / "file.sealed.msb", identity=KEY)
    assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]


VALID = [(name, i) for name, v in CASES["valid"].items() for i in range(len(v["identities"]))]


@pytest.mark.parametrize(("name", "which"), VALID, ids=[f"{n}-{i}" for n, i in VALID])
def test_valid_cases(name: str, which: int) -> None:
    """One valid vector per stanza type, and a sealed directory tree, read by both readers."""
    meta = CASES["valid"][name]
    path, identity = HERE / name, meta["identities"][which]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
    if meta["kind"] == "safetensors":
        opened = check_tensors(path, identity, meta["tensors"])
        assert [s["type"] for s in container(path.read_bytes())[0]["recipients"]] == [meta["stanza"]]
        assert ("index_ct" in opened.protected) == meta["hidden"]
        assert b64(opened.protected["artifact_id"]).hex() == meta["artifact_id_hex"]
        return
    opened, files = independent_bundle(path, read_key(identity))
    assert opened.dek.hex() == CASES["dek_hex"]
    assert b64(opened.protected["artifact_id"]).hex() == meta["artifact_id_hex"]
    assert opened.index["root"] == meta["root"] and opened.index["dirs"] == meta["dirs"]
    assert {n: (mode, len(d), hashlib.sha256(d).hexdigest()) for n, (mode, d) in files.items()} == {
        n: (f["mode"], f["size"], f["sha256"]) for n, f in meta["files"].items()
    }
    with modelseal.open_bundle(path, modelseal_identity(identity)) as ours:
        manifest = ours.manifest()
        assert manifest["root"] == meta["root"] and manifest["dirs"] == meta["dirs"]
        assert {e["name"]: e["mode"] for e in manifest["entries"]} == {n: f["mode"] for n, f in meta["files"].items()}
        for n, f in meta["files"].items():
            assert hashlib.sha256(ours.read(n)).hexdigest() == f["sha256"]


# ------------------------------------------------------------------------------------ failure vectors

FAILURES = CASES["failures"]
IDS = [f"{c['file'].split('.')[0]}-{c['file'].rsplit('.', 1)[1]}-{c['reason']}" for c in FAILURES]


def test_every_failure_is_covered() -> None:
    """What the issue asks for: each cause, for both containers where it applies, each stanza type."""
    reasons = {(c["reason"], c["file"].rsplit(".", 1)[1]) for c in FAILURES}
    for container_ext in ("safetensors", "msb"):
        for reason in ("header-mac", "payload", "no-matching-identity", "truncated"):
            assert (reason, container_ext) in reasons
    tampered = {c["file"] for c in FAILURES if c["file"].startswith("fail-stanza-")}
    assert {f.split(".")[0].removeprefix("fail-stanza-") for f in tampered} == {
        "x25519",
        "mlkem768x25519",
        "scrypt",
        "symmetric",
    }
    assert {v["stanza"] for v in CASES["valid"].values() if "stanza" in v} == {
        "x25519",
        "mlkem768x25519",
        "scrypt",
        "symmetric",
    }
    assert any("passphrase" in c["identity"] and "from" not in c for c in FAILURES)  # a wrong passphrase
    cut = {c["file"] for c in FAILURES if "truncate" in c.get("change", {})}
    assert {f.split(".")[0] for f in cut} == {"fail-truncated-header", "fail-truncated-payload"}


DERIVED = [(c, i) for c, i in zip(FAILURES, IDS, strict=True) if "from" in c]


@pytest.mark.parametrize("case", [c for c, _ in DERIVED], ids=[i for _, i in DERIVED])
def test_failure_vector_is_its_base_with_one_change(case: dict[str, Any]) -> None:
    """Each failure vector differs from a valid vector exactly as ``cases.json`` says, and nowhere else."""
    base = (HERE / case["from"]).read_bytes()
    change = case["change"]
    if "truncate" in change:
        expected = base[: change["truncate"]]
    else:
        at, old, new = change["offset"], bytes.fromhex(change["old_hex"]), bytes.fromhex(change["new_hex"])
        assert base[at : at + len(old)] == old
        expected = base[:at] + new + base[at + len(old) :]
    raw = (HERE / case["file"]).read_bytes()
    assert raw == expected
    assert hashlib.sha256(raw).hexdigest() == case["sha256"]


def modelseal_read(path: Path, identity: dict[str, str]) -> object:
    """Everything in ``path`` through modelseal's public API."""
    if path.read_bytes()[:8] == b"MSEALBN1":
        with modelseal.open_bundle(path, modelseal_identity(identity)) as b:
            return {name: b.read(name) for name in b.names()}
    return modelseal.numpy.load_file(path, identity=modelseal_identity(identity))


@pytest.mark.parametrize("case", FAILURES, ids=IDS)
def test_failure_modelseal(case: dict[str, Any]) -> None:
    """modelseal raises exactly the expected error class, with its stable message, naming the file."""
    path = HERE / case["file"]
    with pytest.raises(errors.ModelsealError) as caught:
        modelseal_read(path, case["identity"])
    assert type(caught.value) is getattr(errors, case["error"])
    message = str(caught.value)
    assert case["message"] in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("case", FAILURES, ids=IDS)
def test_failure_independent(case: dict[str, Any]) -> None:
    """The independent reader refuses each failure vector at the step ``cases.json`` names."""
    with pytest.raises(RefusedError) as caught:
        if case["file"].endswith(".msb"):
            independent_bundle(HERE / case["file"], read_key(case["identity"]))
        else:
            independent_read(HERE / case["file"], read_key(case["identity"]))
    assert caught.value.reason == case["reason"]


PAYLOAD = [c for c in FAILURES if c["reason"] == "payload"]
CASES_SEGMENT_SIZE = 4096  # every vector's segment_size (checked below): no segment is longer


@pytest.mark.parametrize("case", PAYLOAD, ids=[c["file"] for c in PAYLOAD])
def test_failure_leaves_no_partial_data(case: dict[str, Any]) -> None:
    """A segment that fails its tag fails the whole read, and every destination buffer is wiped,
    including those of entries (and segments) that decrypted correctly before or beside it."""
    with modelseal.open_artifact(HERE / case["file"], modelseal_identity(case["identity"])) as art:
        assert art.segment_size == CASES_SEGMENT_SIZE
        bufs = [(e, bytearray(b"\xa5" * e.length)) for e in art.entries]
        with pytest.raises(errors.AuthenticationError, match="failed authentication"):
            art.decrypt_many([(e, memoryview(b)) for e, b in bufs])
    assert sum(len(b) for _, b in bufs) > CASES_SEGMENT_SIZE  # more than the failing segment was decrypted
    assert all(not any(b) for _, b in bufs)
