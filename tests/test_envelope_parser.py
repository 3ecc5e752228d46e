"""Property tests for the envelope parser: hostile headers give FormatError-family errors only."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bench.fuzzlib import assemble, envelope_of, parse, rewrite_sealed, with_envelope
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, ModelsealError
from modelseal.format.bundle import SealedBundle
from modelseal.format.envelope import Envelope
from modelseal.format.safetensors import SealedSafetensors
from modelseal.load.bundles import read_all
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.sealing.operations import open_to_disk

IDENT = HpkeIdentity.generate(KEMS["x25519"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "format",
    "kind",
    "model_id",
    "model_version",
    "artifact_id",
    "segment_size",
    "payload_size",
    "tag_count",
    "group",
    "index",
    "index_ct",
]


def _good_envelope(tmp: Path) -> tuple[dict, dict]:  # type: ignore[type-arg]
    import numpy as np

    save_file({"w": np.ones(10, np.float32)}, str(tmp / "p.safetensors"))
    modelseal.seal(tmp / "p.safetensors", tmp / "s.safetensors", [IDENT.recipient])
    with SealedSafetensors.open(tmp / "s.safetensors") as art:
        env = json.loads(art.envelope.to_json())
    return env, json.loads(b64d(env["protected"]))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
def test_hostile_protected_fields(tmp_path_factory, field: str, value: object, drop: bool) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("env")
    env, prot = _good_envelope(tmp)
    if drop:
        prot.pop(field, None)
    else:
        prot[field] = value
    env["protected"] = b64e(json.dumps(prot).encode())
    try:
        parsed = Envelope.parse(json.dumps(env), "x")
        parsed.unwrap(IDENT, "x")
        parsed.index(bytes(32), "x")
    except ModelsealError:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200) | json_values.map(json.dumps))
def test_arbitrary_envelope_text(text: str) -> None:
    try:
        Envelope.parse(text, "x")
    except ModelsealError:
        pass


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=300))
def test_arbitrary_files(tmp_path_factory, blob: bytes) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path_factory.mktemp("blob") / "f"
    p.write_bytes(blob)
    for opener in (SealedSafetensors.open, SealedBundle.open):
        try:
            opener(p).close()
        except ModelsealError:
            pass
    p.write_bytes(b"MSEALBN1" + blob)
    try:
        SealedBundle.open(p).close()
    except ModelsealError:
        pass


# ------------------------------------------------------------------ regression tests of issue 14, item 4
# Each builds the hostile file the attack run used: outer JSON edits need no key; edits of the protected
# header or hidden index are re-encrypted and re-MACed with the data key (a key holder, or a buggy tool).

MLKEM = HpkeIdentity.generate(KEMS["mlkem768x25519"])
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A public and a hidden sealed safetensors file, an ML-KEM one, and a sealed single-file bundle."""
    d = tmp_path_factory.mktemp("sealed")
    save_file({"w": np.arange(10, dtype=np.float32), "b": np.ones(3, np.int64)}, str(d / "p.safetensors"))
    (d / "model.onnx").write_bytes(b"not really onnx, but any file seals as a bundle")
    out = {
        "public": d / "public.safetensors",
        "hidden": d / "hidden.safetensors",
        "mlkem": d / "mlkem.safetensors",
        "bundle": d / "model.onnx.sealed",
    }
    modelseal.seal(d / "p.safetensors", out["public"], [IDENT.recipient])
    modelseal.seal(d / "p.safetensors", out["hidden"], [IDENT.recipient], hide_header=True)
    modelseal.seal(d / "p.safetensors", out["mlkem"], [MLKEM.recipient], hide_header=True)
    modelseal.seal(d / "model.onnx", out["bundle"], [IDENT.recipient])
    return out


def _dek(path: Path, identity: HpkeIdentity = IDENT) -> bytes:
    with modelseal.open_artifact(path, identity) as art:
        return bytes(art.dek)


def _load(path: Path, identity: HpkeIdentity = IDENT) -> object:
    if path.suffix == ".sealed":
        return read_all(path, identity=identity)
    return modelseal.numpy.load_file(path, identity=identity)


def _write(tmp: Path, like: Path, raw: bytes) -> Path:
    out = tmp / f"hostile{like.suffix}"
    out.write_bytes(raw)
    return out


def _outer_edit(raw: bytes, text: str) -> bytes:
    """Replace the outer JSON (safetensors header, or the bundle's envelope) by ``text``."""
    return assemble(parse(raw), text)


@pytest.mark.parametrize("where", ["safetensors header", "envelope", "protected header", "hidden index", "bundle"])
def test_deep_json_is_a_format_error(tmp_path: Path, files: dict[str, Path], where: str) -> None:
    """100,000 nested arrays raised RecursionError on ac0b701; now every document's depth is bounded."""
    if where == "safetensors header":
        raw = files["public"].read_bytes()
        text = json.dumps(parse(raw).outer, separators=(",", ":")).replace('"shape":[10]', f'"shape":{DEEP}', 1)
        path = _write(tmp_path, files["public"], _outer_edit(raw, text))
    elif where == "envelope":
        p = parse(files["public"].read_bytes())
        env = envelope_of(p)
        with_envelope(p, json.dumps(env).replace('"signature": null', f'"signature": {DEEP}'))
        path = _write(tmp_path, files["public"], assemble(p))
    elif where == "protected header":
        src = files["public"]
        raw = rewrite_sealed(src.read_bytes(), _dek(src), protected=lambda pr: json.dumps({**pr, "x": 0}).replace(
            '"x": 0', f'"x": {DEEP}'), relist=True)
        path = _write(tmp_path, src, raw)
    elif where == "hidden index":
        src = files["hidden"]
        raw = rewrite_sealed(src.read_bytes(), _dek(src), index=lambda idx: json.dumps({**idx, "metadata": 0}).replace(
            '"metadata": 0', f'"metadata": {DEEP}'))
        path = _write(tmp_path, src, raw)
    else:
        src = files["bundle"]
        raw = rewrite_sealed(src.read_bytes(), _dek(src), index=lambda idx: json.dumps({**idx, "dirs": 0}).replace(
            '"dirs": 0', f'"dirs": {DEEP}'))
        path = _write(tmp_path, src, raw)
    with pytest.raises(FormatError, match="levels deep, over the limit"):
        _load(path)


@pytest.mark.parametrize("field", ["__metadata__", "__modelseal_tags__"])
@pytest.mark.parametrize("value", [["modelseal"], "text", 7, True])
def test_listing_fields_must_be_objects(tmp_path: Path, files: dict[str, Path], field: str, value: object) -> None:
    """``__metadata__``/``__modelseal_tags__`` that are not objects raised AttributeError on ac0b701."""
    for kind in ("public", "hidden"):
        p = parse(files[kind].read_bytes())
        p.outer[field] = value
        path = _write(tmp_path, files[kind], assemble(p))
        with pytest.raises(FormatError):
            _load(path)


MANIFEST_EDITS = {
    "mode is text": lambda m: m["entries"][0].update(mode="0644"),
    "mode is negative": lambda m: m["entries"][0].update(mode=-1),
    "mode is a float": lambda m: m["entries"][0].update(mode=420.0),
    "root is a number": lambda m: m.update(root=5),
    "root file, no entries": lambda m: m.update(entries=[]),
    "name is a number": lambda m: m["entries"][0].update(name=7),
    "name escapes": lambda m: m["entries"][0].update(name="../evil"),
    "offsets are floats": lambda m: m["entries"][0].update(offsets=[0.0, float(m["entries"][0]["offsets"][1])]),
    "offsets are text": lambda m: m["entries"][0].update(offsets=["0", "10"]),
    "offsets are booleans": lambda m: m["entries"][0].update(offsets=[False, True]),
    "dirs is text": lambda m: m.update(dirs="x"),
    "dirs hold a number": lambda m: m.update(root="dir", dirs=[3]),
    "a file where a directory goes": lambda m: m.update(root="dir", dirs=[m["entries"][0]["name"] + "/sub"]),
    "entries is an object": lambda m: m.update(entries={}),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS.values(), ids=MANIFEST_EDITS.keys())
def test_remaced_bundle_manifest_with_wrong_types(tmp_path: Path, files: dict[str, Path], edit: Any) -> None:
    """A re-MACed manifest with wrong field types gave TypeError/IndexError on ac0b701 (``modelseal open``)."""
    src = files["bundle"]

    def rewrite(manifest: dict[str, Any]) -> str:
        edit(manifest)
        return json.dumps(manifest)

    path = _write(tmp_path, src, rewrite_sealed(src.read_bytes(), _dek(src), index=rewrite))
    with pytest.raises(FormatError):
        open_to_disk(path, tmp_path / "out", IDENT)
    assert not (tmp_path / "out").exists()


INDEX_EDITS = {
    "dtype is a list": lambda i: i["entries"][0].update(dtype=["F32"]),
    "shape holds text": lambda i: i["entries"][0].update(shape=["10"]),
    "shape holds booleans": lambda i: i["entries"][0].update(shape=[True]),
    "metadata is a list": lambda i: i.update(metadata=[["a", "b"]]),
    "metadata values are numbers": lambda i: i.update(metadata={"a": 1}),
    "entry is a list": lambda i: i["entries"].__setitem__(0, ["w"]),
    "reserved name": lambda i: i["entries"][0].update(name="__modelseal_tags__"),
    "name is a lone surrogate": lambda i: i["entries"][0].update(name="\ud800"),  # found by bench/fuzz.py
    "shape has 100 dimensions": lambda i: i["entries"][0].update(shape=i["entries"][0]["shape"] + [1] * 99),
    "index is a list": lambda i: i.clear() or i.update(entries=5),
}


@pytest.mark.parametrize("edit", INDEX_EDITS.values(), ids=INDEX_EDITS.keys())
@pytest.mark.parametrize("kind", ["hidden", "mlkem"])
def test_remaced_index_with_wrong_types(tmp_path: Path, files: dict[str, Path], edit: Any, kind: str) -> None:
    """The index is checked after authentication too: a key holder can MAC anything."""
    src, ident = files[kind], (MLKEM if kind == "mlkem" else IDENT)

    def rewrite(index: dict[str, Any]) -> str:
        edit(index)
        return json.dumps(index)

    path = _write(tmp_path, src, rewrite_sealed(src.read_bytes(), _dek(src, ident), index=rewrite))
    with pytest.raises(FormatError):
        modelseal.numpy.load_file(path, identity=ident)


STANZA_EDITS = {
    "ct is a number": lambda s: s.update(ct=5),
    "ct is too short": lambda s: s.update(ct=s["ct"][:-4]),
    "ct is not base64": lambda s: s.update(ct="!" * len(s["ct"])),
    "kid is a list": lambda s: s.update(kid=[1]),
    "kid is huge": lambda s: s.update(kid="A" * 100_000),
    "type is a number": lambda s: s.update(type=5),
    "stanza is a list": None,
}


@pytest.mark.parametrize("edit", STANZA_EDITS.values(), ids=STANZA_EDITS.keys())
@pytest.mark.parametrize("kind", ["public", "mlkem"])
def test_recipient_stanza_schema(tmp_path: Path, files: dict[str, Path], edit: Any, kind: str) -> None:
    """Stanzas are outside the MAC: every field of the x25519 and ML-KEM stanzas is type- and size-checked."""
    p = parse(files[kind].read_bytes())
    env = envelope_of(p)
    if edit is None:
        env["recipients"][0] = ["x25519"]
    else:
        edit(env["recipients"][0])
    with_envelope(p, env)
    path = _write(tmp_path, files[kind], assemble(p))
    with pytest.raises(FormatError, match="recipient stanza"):
        SealedSafetensors.open(path).close()


def test_too_many_stanzas(tmp_path: Path, files: dict[str, Path]) -> None:
    p = parse(files["public"].read_bytes())
    env = envelope_of(p)
    env["recipients"] = env["recipients"] * 2000
    with_envelope(p, env)
    path = _write(tmp_path, files["public"], assemble(p))
    with pytest.raises(FormatError, match="more than the limit"):
        SealedSafetensors.open(path).close()


def test_too_many_passphrase_stanzas(tmp_path: Path, files: dict[str, Path]) -> None:
    """Stanzas are outside the MAC: a host must not be made to run scrypt (up to 4 GiB each) many times."""
    p = parse(files["public"].read_bytes())
    env = envelope_of(p)
    env["recipients"] = [{"type": "scrypt", "salt": b64e(bytes(16)), "log_n": 22, "ct": b64e(bytes(48))}] * 5
    with_envelope(p, env)
    path = _write(tmp_path, files["public"], assemble(p))
    with pytest.raises(FormatError, match="passphrase \\(scrypt\\) stanzas, more than the limit"):
        SealedSafetensors.open(path).close()


def test_duplicate_keys_are_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    """Two readers could take different values of a duplicated key (parser differential): refuse it."""
    raw = files["public"].read_bytes()
    text = json.dumps(parse(raw).outer, separators=(",", ":"))
    text = '{"w":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},' + text[1:]  # "w" listed twice
    path = _write(tmp_path, files["public"], _outer_edit(raw, text))
    with pytest.raises(FormatError, match="duplicate key"):
        SealedSafetensors.open(path).close()


def test_header_length_field_past_the_cap(tmp_path: Path, files: dict[str, Path]) -> None:
    raw = files["public"].read_bytes()
    path = _write(tmp_path, files["public"], struct.pack("<Q", (100 << 20) + 1) + raw[8:])
    with pytest.raises(FormatError, match="over the limit"):
        SealedSafetensors.open(path).close()
