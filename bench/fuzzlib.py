"""Seeded mutation fuzzing of every sealed artifact kind; used by ``bench/fuzz.py`` and ``tests/test_fuzz.py``.

Why here and not under ``src``: the engine has no use inside the library, and ``bench`` must not import
``tests`` (docs of the layout issue); the test imports it as ``bench.fuzzlib``.

A *corpus* holds one sealed artifact of each kind (public, hidden and signed safetensors, an ML-KEM
sealed safetensors file, ONNX and TorchScript bundles, a sealed model directory), the plaintext each
must decrypt to, and a *twin* of each (same input, another model version and data key) for splices.
Case ``i`` of seed ``s`` draws its mutation from ``random.Random(f"{s}:{i}")`` alone, so any case
reruns on its own. The fuzzer holds the data keys, so it can also rewrite the authenticated parts
(protected header, hidden index) and re-MAC/re-encrypt them, as a key holder or a buggy tool could:
that exercises the checks that run *after* authentication.

The oracle: a load either raises a ``ModelsealError`` subclass, or returns exactly the original
content (names, dtypes, shapes, metadata and bytes). Re-MACed mutants may change descriptive fields
(a key holder may relabel a tensor's shape), never a tensor's bytes. Anything else is a bug, and so is
a case that runs past its time bound or grows the address space by more than its memory bound.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import modelseal
import modelseal.numpy
import modelseal.transformers
from modelseal.crypto import keys
from modelseal.encoding import b64d, b64e, lp
from modelseal.errors import ModelsealError
from modelseal.load.bundles import read_all
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.sealing.operations import verify

SEG = 4096  # the smallest segment size: several segments per tensor in small files
Content = dict[str, Any]  # what a load returned, in a comparable form
INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 15, 16, 4095, 4096, 4097, 65536, 2**31 - 1, 2**31, 2**32, 2**32 + 1,
                    2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 1 << 30, (1 << 30) + 1, 100 << 20, 305 << 20, 10**30]
MUTATIONS = ("flip", "run", "truncate", "extend", "shift", "length", "json", "stanza", "remac", "resegment",
             "deep", "typeswap", "splice", "dirsplice")


class CaseTimeout(BaseException):  # a BaseException: no ``except Exception`` in a loader eats it
    """A case ran past its time bound (a hang)."""


# --------------------------------------------------------------------------------------------- corpus


@dataclass
class Target:
    """One sealed artifact, how to load it, and what it must load as."""

    kind: str
    path: Path
    twin: Path
    load: Callable[[Path], Content]
    expected: Content
    identity: Any
    signers: list[str] | None = None
    dek: bytes = b""
    directory: bool = False


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((40, 64)).astype(np.float32),  # 10240 bytes: 3 segments
        "layer.0.weight": rng.standard_normal((16, 16)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(16).astype(np.float64),
        "counts": rng.integers(-1000, 1000, size=(7, 3), dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _tensor_content(tensors: dict[str, Any], metadata: dict[str, str]) -> Content:
    out: Content = {name: (str(a.dtype), tuple(a.shape), a.tobytes()) for name, a in tensors.items()}
    out["__metadata__"] = dict(metadata)
    return out


def _safetensors_loader(identity: Any, signers: list[str] | None) -> Callable[[Path], Content]:
    def load(path: Path) -> Content:
        with modelseal.safe_open(path, "np", identity=identity, trusted_signers=signers) as f:
            return _tensor_content(f.get_tensors(), f.metadata())

    return load


def _bundle_loader(identity: Any) -> Callable[[Path], Content]:
    def load(path: Path) -> Content:
        return {name: bytes(data) for name, data in read_all(path, identity=identity).items()}

    return load


def _directory_loader(identity: Any) -> Callable[[Path], Content]:
    def load(path: Path) -> Content:
        state = modelseal.transformers.load_state_dict(path, identity=identity, framework="np")
        out = _tensor_content(state, {})
        for name in ("config.json", "tokenizer.json"):
            out[name] = bytes(modelseal.transformers.read_file(path, name, identity=identity))
        return out

    return load


def _onnx_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    return bytes(onnx.helper.make_model(graph).SerializeToString())


def _torchscript_model(path: Path) -> None:
    import torch

    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    torch.jit.save(module, str(path))


def _dek(path: Path, identity: Any) -> bytes:
    with modelseal.open_artifact(path, identity) as art:
        return bytes(art.dek)


def build_corpus(work: Path, kinds: tuple[str, ...] | None = None) -> list[Target]:
    """Seal one artifact of each kind (and its twin) under ``work``; small, so each load takes ~1 ms."""
    x25519 = HpkeIdentity.generate(KEMS["x25519"])
    mlkem = HpkeIdentity.generate(KEMS["mlkem768x25519"])
    signer = modelseal.Signer.generate()
    work.mkdir(parents=True, exist_ok=True)
    plain = work / "plain.safetensors"
    from safetensors.numpy import save_file

    tensors, metadata = _tensors(1), {"format": "np", "author": "fuzz"}
    save_file(tensors, str(plain), metadata=metadata)
    expected = _tensor_content(tensors, metadata)
    targets: list[Target] = []

    def sealed(name: str, src: Path, ident: HpkeIdentity, **opts: Any) -> tuple[Path, Path]:
        out = []
        for version in ("1", "2"):
            dst = work / f"{name}.v{version}{'' if src.is_dir() else src.suffix}"
            modelseal.seal(src, dst, [ident.recipient], model_id="fuzz", model_version=version,
                           segment_size=SEG, **opts)
            out.append(dst)
        return out[0], out[1]

    want = kinds or ("public", "hidden", "signed", "mlkem", "onnx", "torchscript", "dir")
    for kind in want:
        if kind in ("public", "hidden", "signed", "mlkem"):
            ident = mlkem if kind == "mlkem" else x25519
            opts: dict[str, Any] = {"hide_header": kind in ("hidden", "mlkem")}
            if kind == "signed":
                opts["signer"] = signer
            path, twin = sealed(kind, plain, ident, **opts)
            signers = [signer.public] if kind == "signed" else None
            load = _safetensors_loader(ident, signers)
            targets.append(Target(kind, path, twin, load, expected, ident, signers, _dek(path, ident)))
        elif kind in ("onnx", "torchscript"):
            src = work / ("model.onnx" if kind == "onnx" else "model.pt")
            if kind == "onnx":
                src.write_bytes(_onnx_model())
            else:
                _torchscript_model(src)
            ident = mlkem if kind == "onnx" else x25519  # ML-KEM stanzas in a bundle header as well
            path, twin = sealed(kind, src, ident, as_bundle=True)
            want_files = {src.name: src.read_bytes()}
            targets.append(Target(kind, path, twin, _bundle_loader(ident), want_files, ident, None, _dek(path, ident)))
        elif kind == "dir":
            src = work / "hf"
            src.mkdir()
            save_file(tensors, str(src / "model.safetensors"))
            (src / "config.json").write_text(json.dumps({"model_type": "fuzz", "hidden_size": 64}))
            (src / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0, "b": 1}}))
            path, twin = sealed(kind, src, x25519)
            want_dir = _tensor_content(tensors, {})
            want_dir.update({n: (src / n).read_bytes() for n in ("config.json", "tokenizer.json")})
            dek = _dek(path / "model.safetensors", x25519)  # one data key for every member
            targets.append(Target(kind, path, twin, _directory_loader(x25519), want_dir, x25519, None, dek, True))
        else:
            raise ValueError(f"unknown artifact kind {kind!r}")
    return targets


# ----------------------------------------------------------------------------------- container access


@dataclass
class Parsed:
    """A sealed file cut into its parts: the outer JSON (safetensors header or bundle envelope)."""

    bundle: bool
    outer: Any  # safetensors header dict, or the envelope dict for a bundle
    head_len: int  # bytes before the payload
    rest: bytes  # payload and tags


def parse(raw: bytes) -> Parsed:
    bundle = raw[:8] == b"MSEALBN1"
    at = 8 if bundle else 0
    (n,) = struct.unpack("<Q", raw[at : at + 8])
    start = at + 8
    return Parsed(bundle, json.loads(raw[start : start + n]), start + n, raw[start + n :])


def envelope_of(p: Parsed) -> dict[str, Any]:
    return p.outer if p.bundle else json.loads(p.outer["__metadata__"]["modelseal"])


def with_envelope(p: Parsed, env: dict[str, Any] | str) -> None:
    if p.bundle:
        p.outer = env
    else:
        p.outer["__metadata__"]["modelseal"] = env if isinstance(env, str) else json.dumps(env)


def assemble(p: Parsed, outer_text: str | None = None, pad_to: int | None = None) -> bytes:
    """Serialise ``p``; the header keeps its length when the new JSON fits (payload stays in place)."""
    text = (outer_text if outer_text is not None else json.dumps(p.outer, separators=(",", ":"))).encode()
    prefix = 16 if p.bundle else 8
    room = p.head_len - prefix if pad_to is None else pad_to
    if len(text) <= room:
        text += b" " * (room - len(text))
    magic = b"MSEALBN1" if p.bundle else b""
    return magic + struct.pack("<Q", len(text)) + text + p.rest


# ------------------------------------------------------------------------------------------ JSON edits

_DEEP = "\x00deep:"  # sentinel strings, replaced in the serialised text (json.dumps cannot nest 100k deep)
_BIGNUM = "\x00bignum"
_DEEP_TEXT = re.compile(r'"\\u0000deep:(\d{1,6})"')  # a sentinel as serialised; edited ones stay strings


def _paths(value: Any) -> list[list[Any]]:
    """Every path (list of keys/indices) into ``value``, iteratively, root included."""
    out: list[list[Any]] = []
    stack: list[tuple[list[Any], Any]] = [([], value)]
    while stack and len(out) < 5000:
        path, v = stack.pop()
        out.append(path)
        if isinstance(v, dict):
            stack.extend(([*path, k], c) for k, c in v.items())
        elif isinstance(v, list):
            stack.extend(([*path, i], c) for i, c in enumerate(v))
    return out


def _get(value: Any, path: list[Any]) -> Any:
    for k in path:
        value = value[k]
    return value


def _other_type(rng: random.Random, old: Any) -> Any:
    """A value of another JSON type than ``old`` (or a hostile one of the same type)."""
    choices: list[Any] = [
        None, True, False, rng.choice(INTERESTING_INTS), -rng.choice(INTERESTING_INTS), 1.5, -0.0, 1e308,
        "", "x" * rng.choice([1, 64, 4096]), "../../etc/passwd", "/abs", "a\u0000b", "\ud800", "__metadata__",
        "__modelseal_tags__", [], [rng.randint(0, 9)], [[0, 1]], {}, {"a": 1}, {"entries": []},
        f"{_DEEP}{rng.choice([17, 100, 1000, 100_000])}", _BIGNUM,
    ]
    while True:
        new = rng.choice(choices)
        if type(new) is not type(old) or rng.random() < 0.3:
            return new


def edit_json(rng: random.Random, doc: Any, op: str, under: list[Any] | None = None) -> Any:
    """Apply one edit (``typeswap``, ``deep`` or a generic ``json`` edit) to a copy of ``doc``."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if under is None or p[: len(under)] == under] or [[]]
    path = rng.choice(paths)
    if op == "deep":
        new: Any = f"{_DEEP}{rng.choice([16, 17, 64, 1000, 5000, 100_000])}"
    elif op == "typeswap" or rng.random() < 0.4:
        new = _other_type(rng, _get(doc, path) if path else doc)
    else:
        parent = _get(doc, path[:-1]) if path else None
        action = rng.choice(["delete", "dup", "add", "int", "str"])
        if action == "delete" and parent is not None:
            del parent[path[-1]]
            return doc
        if action == "dup" and isinstance(parent, list):
            parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
            return doc
        target = _get(doc, path)
        if action == "add" and isinstance(target, dict):
            target[rng.choice(["extra", "index", "group", "kid", "metadata", "__proto__"])] = _other_type(rng, None)
            return doc
        if action == "add" and isinstance(target, list):
            target.append(_other_type(rng, None))
            return doc
        if isinstance(target, int) and not isinstance(target, bool):
            new = rng.choice([target + 1, target - 1, target * 2, 0, -target, rng.choice(INTERESTING_INTS)])
        elif isinstance(target, str) and target:
            i = rng.randrange(len(target))
            new = target[:i] + rng.choice(["", "A", "_", "=", "..", "/"]) + target[i + 1 :]
        else:
            new = _other_type(rng, target)
    if not path:
        return new
    _get(doc, path[:-1])[path[-1]] = new
    return doc


def dumps(doc: Any, rng: random.Random) -> str:
    """Serialise, expanding sentinels into deep nesting / huge numbers, sometimes with a duplicate key."""
    text = json.dumps(doc, separators=(",", ":"))
    text = _DEEP_TEXT.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)
    text = text.replace('"\\u0000bignum"', "9" * 5000)
    if rng.random() < 0.05 and text.startswith('{"'):
        key = text[1 : text.index('"', 2) + 1]
        text = "{" + key + ":0," + text[1:]  # the first key twice
    return text


# ---------------------------------------------------------------------------------- keyed rewriting


def _mac_key(dek: bytes, artifact_id: bytes) -> bytes:
    return keys.derive(dek, artifact_id, keys.PURPOSE_HEADER_MAC)


def rewrite_sealed(
    raw: bytes,
    dek: bytes,
    *,
    protected: Callable[[dict[str, Any]], str] | None = None,
    index: Callable[[Any], str] | None = None,
    relist: bool = False,
) -> bytes:
    """Re-encrypt and re-MAC a sealed file after rewriting its protected header and/or hidden index.

    ``protected`` and ``index`` take the parsed document and return the new JSON *text* (so it can
    be anything: deep, duplicated keys, wrong types). This is what a key holder can do; the reader
    must still refuse every malformed result with a ModelsealError. Follows docs/format.md only.
    """
    p = parse(raw)
    env = envelope_of(p)
    prot = json.loads(b64d(env["protected"]))
    aid = b64d(prot["artifact_id"])
    if index is not None:
        key = keys.derive(dek, aid, keys.PURPOSE_INDEX)
        aad = lp(b"modelseal/1 index") + aid
        plain_index = json.loads(AESGCM(key).decrypt(bytes(12), b64d(prot["index_ct"]), aad))
        ct = AESGCM(key).encrypt(bytes(12), index(plain_index).encode("utf-8", "surrogatepass"), aad)
        prot["index_ct"] = b64e(ct)
    prot_text = protected(prot) if protected is not None else json.dumps(prot, separators=(",", ":"))
    try:
        new_aid = b64d(json.loads(prot_text).get("artifact_id"), length=16)
    except (ModelsealError, ValueError, AttributeError, TypeError, RecursionError):
        new_aid = aid  # the reader refuses this header anyway; MAC it under the old id
    if relist and not p.bundle:
        _relist(p, prot_text)
    raw_prot = prot_text.encode("utf-8", "surrogatepass")
    env["protected"] = b64e(raw_prot)
    env["mac"] = b64e(hmac.new(_mac_key(dek, new_aid), raw_prot, hashlib.sha256).digest())
    with_envelope(p, env)
    return assemble(p)


def remac(rng: random.Random, target: Target, raw: bytes, op: str) -> bytes:
    """A random edit of the hidden index or the protected header (under ``index`` half the time)."""
    prot = json.loads(b64d(envelope_of(parse(raw))["protected"]))
    if "index_ct" in prot and rng.random() < 0.6:
        return rewrite_sealed(raw, target.dek, index=lambda idx: dumps(edit_json(rng, idx, op), rng))
    under = ["index"] if "index" in prot and rng.random() < 0.5 else None
    return rewrite_sealed(
        raw, target.dek, protected=lambda pr: dumps(edit_json(rng, pr, op, under), rng), relist=rng.random() < 0.5
    )


def _relist(p: Parsed, prot_text: str) -> None:
    """Rewrite a safetensors listing from an edited protected header, where that is possible, so the
    mutant gets past the listing check to the checks behind it."""
    try:
        prot = json.loads(prot_text)
        size, tags = prot["payload_size"], 16 * prot["tag_count"]
        listing = {k: v for k, v in p.outer.items() if k != "__modelseal_tags__"}
        if "index" in prot:
            listing = {"__metadata__": p.outer["__metadata__"]} | {
                e["name"]: {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["offsets"]}
                for e in prot["index"]["entries"]
            }
        tag_tensor = {"dtype": "U8", "shape": [tags], "data_offsets": [size, size + tags]}
        p.outer = {**listing, "__modelseal_tags__": tag_tensor}
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError):
        pass


def resegment(rng: random.Random, target: Target, raw: bytes) -> bytes:
    """Re-MAC the header with another segment size, a matching tag count and a tag region of that size:
    the reader then plans segments the file was not sealed with (all must fail authentication) and
    must size its buffers by the file, not by the claimed segment size (up to 1 GiB)."""
    new_size = rng.choice([4096, 4097, 8192, 65536, 1 << 20, 1 << 30])
    lengths: list[int] = []

    def note(index: dict[str, Any]) -> None:
        lengths.extend(e["offsets"][1] - e["offsets"][0] for e in index["entries"])

    def index(idx: Any) -> str:
        note(idx)
        return json.dumps(idx)

    def protected(prot: dict[str, Any]) -> str:
        if "index" in prot:
            note(prot["index"])
        prot["segment_size"] = new_size
        prot["tag_count"] = sum(max(1, -(-n // new_size)) for n in lengths)
        return json.dumps(prot)

    hidden = "index_ct" in json.loads(b64d(envelope_of(parse(raw))["protected"]))
    p = parse(rewrite_sealed(raw, target.dek, protected=protected, index=index if hidden else None, relist=True))
    payload = sum(lengths)
    tags = 16 * sum(max(1, -(-n // new_size)) for n in lengths)
    p.rest = p.rest[:payload] + (p.rest[payload:] + bytes(tags))[:tags]
    return assemble(p)


# ------------------------------------------------------------------------------------------ mutators


def _flip(rng: random.Random, raw: bytes, head: int) -> bytes:
    b = bytearray(raw)
    zone = head if rng.random() < 0.6 else len(b)  # the header is where parsing happens
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(zone)] ^= 1 << rng.randrange(8)
    return bytes(b)


def _run(rng: random.Random, raw: bytes, head: int) -> bytes:
    b = bytearray(raw)
    n = rng.randint(1, 64)
    at = rng.randrange(head if rng.random() < 0.6 else len(b))
    fill = rng.choice([b"\x00", b"\xff", b" ", b"[", b"{", b'"', None])
    chunk = os.urandom(n) if fill is None else fill * n
    b[at : at + n] = chunk[: len(b) - at]
    return bytes(b)


def _length(rng: random.Random, raw: bytes) -> bytes:
    at = 8 if raw[:8] == b"MSEALBN1" else 0
    (n,) = struct.unpack("<Q", raw[at : at + 8])
    value = rng.choice([n - 1, n + 1, n - 8, n + 8, n // 2, len(raw), len(raw) - at - 8, len(raw) + 1,
                        *[v for v in INTERESTING_INTS if 0 <= v < 2**64]])
    return raw[:at] + struct.pack("<Q", max(0, value) % 2**64) + raw[at + 8 :]


def _outer_json(rng: random.Random, raw: bytes, op: str, stanza: bool = False) -> bytes:
    """Edit the unauthenticated outer JSON: the safetensors listing, the envelope, or its stanzas."""
    p = parse(raw)
    env = envelope_of(p)
    if stanza:
        edited = edit_json(rng, env, op, ["recipients"])
        many = isinstance(edited, dict) and isinstance(edited.get("recipients"), list)
        small = many and len(text := json.dumps(edited["recipients"])) < 1 << 12 and "\\u0000" not in text
        if many and rng.random() < 0.1 and small:  # (a sentinel would expand to 200 kB, times 1100)
            edited["recipients"] *= rng.choice([10, 600, 1100])  # many stanzas: over the limit, or under it
    elif p.bundle or rng.random() < 0.5:
        edited = edit_json(rng, env, op)
    else:
        return assemble(p, dumps(edit_json(rng, p.outer, op), rng))
    if p.bundle:
        return assemble(p, dumps(edited, rng))
    with_envelope(p, dumps(edited, rng))
    return assemble(p)


def _splice(rng: random.Random, raw: bytes, twin: bytes, head: int) -> bytes:
    """Move ciphertext/tags around inside the file, or bring in the same range from the twin artifact."""
    b = bytearray(raw)
    choice = rng.random()
    if choice < 0.3 and len(twin) == len(raw):  # a range from the other version
        a = rng.randrange(len(b))
        n = rng.choice([16, SEG, rng.randint(1, 2 * SEG)])
        b[a : a + n] = twin[a : a + n]
    elif choice < 0.45:  # the whole header of the twin over this payload (or the reverse)
        tp = parse(twin)
        b = bytearray(twin[: tp.head_len] + raw[head:] if rng.random() < 0.5 else raw[:head] + twin[tp.head_len :])
    else:  # swap two aligned blocks (segments, tags) inside the payload
        span = len(b) - head
        if span < 32:
            return bytes(b)
        n = rng.choice([16, 32, SEG])
        n = min(n, span // 2)
        i, j = head + rng.randrange(span - n), head + rng.randrange(span - n)
        b[i : i + n], b[j : j + n] = raw[j : j + n], raw[i : i + n]
    return bytes(b)


def mutate_file(rng: random.Random, target: Target, raw: bytes, twin: bytes, op: str) -> bytes:
    """One mutation of class ``op`` of the sealed file ``raw``."""
    try:
        head = parse(raw).head_len
    except (ValueError, struct.error):  # a member already damaged by an earlier edit
        head = min(len(raw), 4096)
    if op == "flip":
        return _flip(rng, raw, head)
    if op == "run":
        return _run(rng, raw, head)
    if op == "truncate":
        return raw[: rng.randrange(len(raw))]
    if op == "extend":
        extra = rng.choice([b"\x00", os.urandom(rng.randint(1, 4096)), raw[-16:], b" " * 4096])
        return raw + extra
    if op == "shift":  # bytes inserted into or removed from the middle
        at = rng.randrange(len(raw))
        if rng.random() < 0.5:
            return raw[:at] + os.urandom(rng.randint(1, 64)) + raw[at:]
        return raw[:at] + raw[at + rng.randint(1, 64) :]
    if op == "length":
        return _length(rng, raw)
    if op == "splice":
        return _splice(rng, raw, twin, head)
    if op == "stanza":
        return _outer_json(rng, raw, "json", stanza=True)
    if op == "resegment":
        return resegment(rng, target, raw)
    keyed = op == "remac" or (op in ("deep", "typeswap") and rng.random() < 0.5)
    if keyed and target.dek:
        return remac(rng, target, raw, "json" if op == "remac" else op)
    return _outer_json(rng, raw, op)


def mutate_directory(rng: random.Random, target: Target, out: Path, op: str) -> None:
    """Write a mutant of the sealed directory to ``out``: one member mutated, or members moved."""
    shutil.copytree(target.path, out)
    members = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    victim = rng.choice(members)
    if op != "dirsplice":
        raw = (out / victim).read_bytes()
        twin = (target.twin / victim).read_bytes()
        (out / victim).write_bytes(mutate_file(rng, target, raw, twin, op))  # members share the data key
        return
    action = rng.choice(["twin", "swap", "delete", "add", "rename", "copy"])
    if action == "twin":  # a member of the other sealing (other data key) dropped in
        shutil.copy(target.twin / victim, out / victim)
    elif action == "swap":  # two members exchange places (same data key)
        other = rng.choice([m for m in members if m != victim])
        a, b = (out / victim).read_bytes(), (out / other).read_bytes()
        (out / victim).write_bytes(b)
        (out / other).write_bytes(a)
    elif action == "delete":
        (out / victim).unlink()
    elif action == "add":  # an extra file: empty, junk, or a copy of a sealed member
        extra = out / rng.choice(["extra.bin", "extra.safetensors", "sub/x.json"])
        extra.parent.mkdir(exist_ok=True)
        extra.write_bytes(rng.choice([b"", b"x" * 100, (out / victim).read_bytes()]))
    elif action == "rename":
        (out / victim).rename(out / (victim + ".renamed"))
    else:  # one member copied over another
        other = rng.choice([m for m in members if m != victim])
        shutil.copy(out / victim, out / other)


# ------------------------------------------------------------------------------------------- running


@dataclass
class Report:
    """Counts over a run; ``bugs`` lists each failing case (seed, index, kind, class, what happened)."""

    cases: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by mutation class
    exceptions: Counter[str] = field(default_factory=Counter)  # by exception type
    accepted_identical: int = 0
    accepted_relabelled: int = 0  # re-MACed: same bytes, descriptive fields changed by the key holder
    bugs: list[dict[str, Any]] = field(default_factory=list)
    bugs_by_class: Counter[str] = field(default_factory=Counter)
    harness_errors: list[str] = field(default_factory=list)  # mutants the harness failed to build
    slowest_s: float = 0.0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()}


def _same_bytes(got: Content, want: Content) -> bool:
    """Every entry has the original bytes (dtype/shape/metadata may be relabelled by a key holder)."""
    if got.keys() != want.keys():
        return False
    for k, v in want.items():
        g = got[k]
        if isinstance(v, tuple):
            if not isinstance(g, tuple) or g[2] != v[2]:
                return False
        elif k != "__metadata__" and g != v:
            return False
    return True


def _alarm(_signum: int, _frame: Any) -> None:
    raise CaseTimeout


@contextmanager
def memory_bound(budget: int) -> Iterator[None]:
    """Let the code inside grow the address space by at most ``budget`` bytes (``RLIMIT_AS``).

    A load that tries to allocate more gets ``MemoryError``, which the oracle counts as a bug: memory
    must follow the (small) file, never a size the file claims. Linux only; elsewhere no bound.
    """
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + budget if hard == resource.RLIM_INFINITY else min(hard, used + budget)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _attempt(call: Callable[[], Any], time_bound_s: float, memory_mib: int) -> tuple[Any, BaseException | None]:
    """``call()`` under the time and memory bounds: (its result, None) or (None, what it raised)."""
    signal.setitimer(signal.ITIMER_REAL, time_bound_s)
    try:
        with memory_bound(memory_mib << 20):
            return call(), None
    except (Exception, CaseTimeout) as exc:
        return None, exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _problem(exc: BaseException, time_bound_s: float, memory_mib: int) -> str | None:
    """None if ``exc`` is an acceptable refusal, else what is wrong."""
    if isinstance(exc, ModelsealError):
        return None if str(exc) else f"{type(exc).__name__} without a message"
    if isinstance(exc, CaseTimeout):
        return f"no answer within {time_bound_s} s (hang)"
    if isinstance(exc, MemoryError):
        return f"needed more than {memory_mib} MiB"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def run_case(
    target: Target, seed: int, index: int, work: Path, report: Report, time_bound_s: float, memory_mib: int
) -> None:
    """Draw and write one mutant, load it, and verify it as `modelseal verify` would; record the outcomes."""
    rng = random.Random(f"{seed}:{index}")
    classes = [c for c in MUTATIONS if c != "dirsplice"] + (["dirsplice"] * 3 if target.directory else [])
    op = rng.choice(classes)
    mutant = work / f"case-{index}"
    try:
        if target.directory:
            mutate_directory(rng, target, mutant, op)
        else:
            raw = target.path.read_bytes()
            mutant = mutant.with_suffix(target.path.suffix)
            mutant.write_bytes(mutate_file(rng, target, raw, target.twin.read_bytes(), op))
    except Exception as exc:  # a flaw of this harness, not of modelseal: keep the run going, report it
        report.harness_errors.append(f"case {index}: {type(exc).__name__}: {str(exc)[:200]}")
        shutil.rmtree(mutant, ignore_errors=True)
        return
    report.cases += 1
    report.by_class[op] += 1
    report.by_kind[target.kind] += 1
    start = time.perf_counter()
    got, exc = _attempt(lambda: target.load(mutant), time_bound_s, memory_mib)
    outcome: str | None = None
    if exc is not None:
        report.exceptions[type(exc).__name__] += 1
        report.refused[op] += isinstance(exc, ModelsealError)
        outcome = _problem(exc, time_bound_s, memory_mib)
    elif got == target.expected:
        report.accepted_identical += 1
    elif op in ("remac", "resegment", "deep", "typeswap") and _same_bytes(got, target.expected):
        report.accepted_relabelled += 1
    else:
        outcome = "accepted with different content"
    _, exc = _attempt(lambda: verify(mutant, target.identity, target.signers), time_bound_s, memory_mib)
    if exc is not None and not isinstance(exc, ModelsealError):  # `modelseal verify` reads it too
        report.exceptions[f"{type(exc).__name__} (verify)"] += 1
        outcome = outcome or f"verify: {_problem(exc, time_bound_s, memory_mib)}"
    report.slowest_s = max(report.slowest_s, time.perf_counter() - start)
    if outcome is not None:
        report.bugs.append({"seed": seed, "case": index, "kind": target.kind, "class": op, "outcome": outcome})
        report.bugs_by_class[op] += 1
    if mutant.is_dir():
        shutil.rmtree(mutant)
    else:
        mutant.unlink(missing_ok=True)


def run(
    targets: list[Target],
    cases: int,
    seed: int,
    work: Path,
    *,
    time_bound_s: float = 10.0,
    memory_mib: int = 512,
    progress: Callable[[Report], None] | None = None,
    first: int = 0,
) -> Report:
    """Run cases ``first .. first+cases-1`` of ``seed``; case ``i`` mutates ``targets[i % len(targets)]``."""
    report = Report()
    previous = signal.signal(signal.SIGALRM, _alarm)
    started = time.perf_counter()
    try:
        for i in range(first, first + cases):
            run_case(targets[i % len(targets)], seed, i, work, report, time_bound_s, memory_mib)
            if progress and report.cases % 1000 == 0:
                progress(report)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mib = peak_rss_mib()
    return report


def peak_rss_mib() -> float:
    """This process's peak resident memory. ``VmHWM`` where there is /proc: ``ru_maxrss`` survives
    ``exec`` on Linux (a child started by a big parent reports the parent's size), ``VmHWM`` does not."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
