"""Sealed safetensors: still a valid safetensors file, every tensor encrypted in place.

Layout (all offsets as in safetensors, relative to the start of the byte buffer)::

    u64 LE N | JSON header (N bytes, space padded) | tensor ciphertext at original offsets | tags

The JSON header keeps ``__metadata__`` with the envelope under the key ``modelseal``. With a public
header it lists every tensor with its dtype, shape and offsets (so any safetensors reader can parse it
and mmap a tensor's ciphertext), plus a ``U8`` tensor ``__modelseal_tags__`` covering the tag region.
With a hidden header it lists only ``__modelseal_payload__`` (all ciphertext, ``U8``) and the tags;
names, dtypes and shapes are then inside the encrypted index. Either way the authoritative index is the
authenticated one in the envelope; the public listing is checked against it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Any

from modelseal.crypto.segments import TAG_SIZE
from modelseal.crypto.signing import Signer
from modelseal.errors import FormatError, UsageError
from modelseal.format.container import (
    Artifact,
    Entry,
    Progress,
    SealRequest,
    entries_from_index,
    map_file,
    write_artifact,
)
from modelseal.format.envelope import Envelope, EnvelopeBuilder
from modelseal.recipients.base import Recipient

TAGS_TENSOR = "__modelseal_tags__"
PAYLOAD_TENSOR = "__modelseal_payload__"
RESERVED = (TAGS_TENSOR, PAYLOAD_TENSOR)
HEADER_ALIGN = 4096  # payload starts page aligned (mmap, O_DIRECT, GPUDirect Storage)
HEADER_SLACK = 4096  # room for rekey to add recipients without moving the payload
MAX_HEADER = 100 << 20  # the safetensors limit

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


def parse_plain_header(buf: memoryview | bytes | bytearray | mmap.mmap, source: str) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; return (header dict, byte offset of the data buffer)."""
    if len(buf) < 8:
        raise FormatError(f"{source} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER or 8 + n > len(buf):
        raise FormatError(f"{source}: safetensors header length {n} is invalid or the file is truncated")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{source}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FormatError(f"{source}: the safetensors header is not a JSON object")
    return header, 8 + n


def tensor_entries(header: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The tensors of a plain safetensors header as index entries, ordered by offset, validated."""
    out = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if name in RESERVED:
            raise UsageError(f"{source}: tensor name {name!r} is reserved by modelseal")
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= t.keys():
            raise FormatError(f"{source}: tensor {name!r} has a malformed header entry")
        out.append({"name": name, "dtype": t["dtype"], "shape": t["shape"], "offsets": list(t["data_offsets"])})
    out.sort(key=lambda e: (e["offsets"][0], e["offsets"][1]))
    for e in out:
        check_tensor(e, source)
    return out


def check_tensor(e: dict[str, Any], source: str) -> None:
    """A tensor's byte length must match its dtype and shape (no silent reinterpretation)."""
    size = DTYPE_SIZES.get(e.get("dtype"))  # type: ignore[arg-type]
    if size is None:
        raise FormatError(f"{source}: tensor {e.get('name')!r} has unsupported dtype {e.get('dtype')!r}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FormatError(f"{source}: tensor {e['name']!r} has a malformed shape")
    begin, end = e["offsets"]
    if (end - begin) != math.prod(shape) * size:
        raise FormatError(f"{source}: tensor {e['name']!r}: {end - begin} bytes do not match {e['dtype']}{shape}")


def _header_bytes(env: Envelope, entries: list[dict[str, Any]], metadata: dict[str, str], size: int | None) -> bytes:
    p = env.protected
    payload_size, tags_len = p["payload_size"], p["tag_count"] * TAG_SIZE
    header: dict[str, Any] = {"__metadata__": {**({} if env.hidden else metadata), "modelseal": env.to_json()}}
    if env.hidden:
        header[PAYLOAD_TENSOR] = {"dtype": "U8", "shape": [payload_size], "data_offsets": [0, payload_size]}
    else:
        for e in entries:
            header[e["name"]] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["offsets"]}
    header[TAGS_TENSOR] = {"dtype": "U8", "shape": [tags_len], "data_offsets": [payload_size, payload_size + tags_len]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if size is None:
        size = -(-(8 + len(raw) + HEADER_SLACK) // HEADER_ALIGN) * HEADER_ALIGN
    if 8 + len(raw) > size:
        raise FormatError("the new header does not fit in the space reserved for it")
    return struct.pack("<Q", size - 8) + raw + b" " * (size - 8 - len(raw))


def seal_buffer(
    plain: memoryview | bytes | bytearray | mmap.mmap,
    dst: str | os.PathLike[str],
    recipients: list[Recipient],
    *,
    builder: EnvelopeBuilder,
    hidden: bool = False,
    signer: Signer | None = None,
    group: dict[str, Any] | None = None,
    source: str = "<buffer>",
    progress: Progress | None = None,
) -> Envelope:
    """Seal the safetensors file held in ``plain`` (bytes or an mmap view) into ``dst``."""
    header, data_start = parse_plain_header(plain, source)
    entries = tensor_entries(header, source)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{source}: __metadata__ must map strings to strings")
    metadata = {k: v for k, v in metadata.items() if k != "modelseal"}
    index = {"entries": entries, "metadata": metadata}
    ents = [Entry(i, e["name"], e["offsets"][0], e["offsets"][1]) for i, e in enumerate(entries)]
    payload = ents[-1].end if ents else 0
    if data_start + payload != len(plain):
        raise FormatError(f"{source}: the safetensors data buffer does not match its header (truncated?)")
    entries_from_index(index, payload, source)  # the same validation the reader applies
    with memoryview(plain) as view:
        req = SealRequest(
            builder,
            ents,
            index,
            lambda off, n: view[data_start + off : data_start + off + n],
            recipients,
            hidden,
            signer,
            group,
        )
        return write_artifact(dst, req, lambda env, size: _header_bytes(env, entries, metadata, size), progress)


class SealedSafetensors(Artifact):
    """A sealed safetensors file opened for reading."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SealedSafetensors:
        src = map_file(path)
        mm = src.mm
        try:
            header, data_start = parse_plain_header(mm, str(path))
            env_text = (header.get("__metadata__") or {}).get("modelseal")
            if not isinstance(env_text, str):
                raise FormatError(f"{path} is a plain safetensors file, not a sealed one (no modelseal envelope)")
            env = Envelope.parse(env_text, str(path))
            if env.protected["kind"] != "safetensors":
                raise FormatError(f"{path}: envelope kind is {env.protected['kind']!r}, expected 'safetensors'")
            art = cls(path, env, data_start, src)
            art._check_public_listing(header)
            return art
        except BaseException:
            src.close()
            raise

    def _check_public_listing(self, header: dict[str, Any]) -> None:
        tags = header.get(TAGS_TENSOR, {})
        want = [self.payload_size, self.payload_size + self.tag_count * TAG_SIZE]
        if tags.get("data_offsets") != want:
            raise FormatError(f"{self.path}: the tag region listed in the safetensors header is inconsistent")
        if not self.envelope.hidden:
            for e in self.entries:
                t = header.get(e.name)
                if (
                    not isinstance(t, dict)
                    or t.get("data_offsets") != [e.begin, e.end]
                    or t.get("dtype") != e.info["dtype"]
                    or t.get("shape") != e.info["shape"]
                ):
                    raise FormatError(
                        f"{self.path}: tensor {e.name!r} in the safetensors header disagrees with the sealed index"
                    )

    def _load_index(self, index: dict[str, Any]) -> None:
        super()._load_index(index)
        for e in self.entries:
            check_tensor(e.info, self.path)

    def metadata(self) -> dict[str, str]:
        md = self.index.get("metadata") or {}
        return dict(md)

    def tensor_info(self, name: str) -> tuple[str, list[int]]:
        e = self.entry(name)
        return e.info["dtype"], list(e.info["shape"])
