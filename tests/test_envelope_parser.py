"""Property tests for the envelope parser: hostile headers give FormatError-family errors only."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import modelseal
from modelseal.encoding import b64d, b64e
from modelseal.errors import ModelsealError
from modelseal.format.bundle import SealedBundle
from modelseal.format.envelope import Envelope
from modelseal.format.safetensors import SealedSafetensors
from modelseal.recipients.hpke import KEMS, HpkeIdentity

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
