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
from typing import TYPE_CHECKING, Any

from modelseal.crypto.segments import TAG_SIZE
from modelseal.errors import FormatError, NotSealedError, UsageError
from modelseal.format import schema
from modelseal.format.container import (
    Artifact,
    ByteSource,
    Destination,
    Entry,
    Progress,
    SealRequest,
    entries_from_index,
    map_file,
    write_artifact,
)
from modelseal.format.dtypes import lookup
from modelseal.format.envelope import Envelope, EnvelopeBuilder
from modelseal.recipients.base import Recipient

if TYPE_CHECKING:
    from modelseal.crypto.signing import Signer

TAGS_TENSOR = "__modelseal_tags__"
PAYLOAD_TENSOR = "__modelseal_payload__"
RESERVED = (TAGS_TENSOR, PAYLOAD_TENSOR)
MAX_DIMS = 64  # numpy's limit; no real tensor comes near it
_SNIFF = 1 << 20  # how far into a file that fails to parse to look for an envelope (damaged vs not sealed)
HEADER_ALIGN = 4096  # payload starts page aligned (mmap, O_DIRECT, GPUDirect Storage)
HEADER_SLACK = 4096  # room for rekey to add recipients without moving the payload


def parse_plain_header(buf: memoryview | bytes | bytearray | mmap.mmap, source: str) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header (size cap, depth, listing schema); return (header, data offset)."""
    if len(buf) < 8:
        raise FormatError(f"{source} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > schema.MAX_HEADER:
        raise FormatError(f"{source}: the safetensors header length {n} is over the limit of {schema.MAX_HEADER} bytes")
    if 8 + n > len(buf):
        raise FormatError(f"{source}: the safetensors header ({n} bytes) runs past the end of the file (truncated?)")
    what = f"{source}: the safetensors header"
    header = schema.obj(schema.document(buf[8 : 8 + n], what), what)
    for name, value in header.items():
        if name == "__metadata__":
            if value is not None:
                schema.string_map(value, f"{what}'s __metadata__")
            continue
        t = schema.obj(value, f"{what}: tensor {name[:80]!r}")
        schema.string(t.get("dtype"), f"{what}: dtype of {name[:80]!r}", max_len=64)
        _shape(t.get("shape"), f"{what}: shape of {name[:80]!r}")
        schema.offsets(t.get("data_offsets"), f"{what}: data_offsets of {name[:80]!r}")
    return header, 8 + n


def _shape(value: Any, what: str) -> list[int]:
    """A shape: at most ``MAX_DIMS`` non-negative integers (numpy cannot make more dimensions)."""
    dims = schema.array(value, what)
    if len(dims) > MAX_DIMS:
        raise FormatError(f"{what} has {len(dims)} dimensions, more than {MAX_DIMS}")
    for d in dims:
        schema.integer(d, what)
    return dims


def tensor_entries(header: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The tensors of a plain safetensors header (checked by :func:`parse_plain_header`) as index
    entries, ordered by offset, with each byte length matching its dtype and shape."""
    out = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if name in RESERVED:
            raise UsageError(f"{source}: tensor name {name!r} is reserved by modelseal")
        out.append({"name": name, "dtype": t["dtype"], "shape": t["shape"], "offsets": list(t["data_offsets"])})
    out.sort(key=lambda e: (e["offsets"][0], e["offsets"][1]))
    for e in out:
        check_tensor(e, source)
    return out


def check_tensor(e: dict[str, Any], source: str) -> None:
    """A tensor's byte length must match its dtype and shape (no silent reinterpretation)."""
    name = str(e.get("name"))[:80]
    dtype = e.get("dtype")
    known = lookup(dtype)
    if known is None:
        raise FormatError(f"{source}: tensor {name!r} has unsupported dtype {dtype!r:.40}")
    shape = _shape(e.get("shape"), f"{source}: shape of tensor {name!r}")
    begin, end = e["offsets"]
    if (end - begin) != math.prod(shape) * known.itemsize:
        raise FormatError(f"{source}: tensor {name!r}: {end - begin} bytes do not match {dtype}{shape}")


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
    dst: str | os.PathLike[str] | Destination,
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
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != "modelseal"}
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
        return cls.from_source(map_file(path))

    @classmethod
    def from_source(cls, src: ByteSource) -> SealedSafetensors:
        """The sealed safetensors in an opened file or remote object (closed here if it is not one).

        Only the header's bytes are read (a remote source holds them in memory): its length first, then
        the header itself, capped before it is read.
        """
        path = src.path
        try:
            head = src.region(0, 8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= schema.MAX_HEADER:
                    head = src.region(0, 8 + n)
            try:
                header, data_start = parse_plain_header(head, str(path))
            except FormatError:
                if src.region(0, 8 + _SNIFF).find(b'"modelseal"', 8) >= 0:
                    raise  # a damaged sealed file: say what is wrong with it
                raise NotSealedError(
                    f"{path} is not a sealed modelseal file (neither a sealed bundle nor sealed safetensors)"
                ) from None
            env_text = (header.get("__metadata__") or {}).get("modelseal")
            if not isinstance(env_text, str):
                raise NotSealedError(
                    f"{path} is not a sealed modelseal file: it is a plain safetensors file (no modelseal envelope)"
                )
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
        """The plain listing (what other safetensors readers see) must say what the sealed index says:
        the tag region, then every tensor (public index) or the one payload tensor (hidden), nothing else."""
        size, tags = self.payload_size, self.tag_count * TAG_SIZE
        want = {TAGS_TENSOR: ("U8", [tags], [size, size + tags])}
        if self.envelope.hidden:
            want[PAYLOAD_TENSOR] = ("U8", [size], [0, size])
        else:
            want.update({e.name: (e.info["dtype"], e.info["shape"], [e.begin, e.end]) for e in self.entries})
        listed = {k: (t["dtype"], t["shape"], t["data_offsets"]) for k, t in header.items() if k != "__metadata__"}
        wrong = sorted(k for k in listed.keys() | want.keys() if listed.get(k) != want.get(k))
        if wrong:
            raise FormatError(
                f"{self.path}: tensor {wrong[0][:80]!r} in the safetensors header disagrees with the sealed index"
            )

    def _load_index(self, index: dict[str, Any]) -> None:
        """Check the safetensors index: string metadata, unreserved names, dtype/shape/length agree."""
        if index.get("metadata") is not None:
            schema.string_map(index["metadata"], f"{self.path}: the index's metadata")
        super()._load_index(index)
        for e in self.entries:
            if e.name in RESERVED or e.name == "__metadata__":
                raise FormatError(f"{self.path}: the index uses the reserved tensor name {e.name!r}")
            check_tensor(e.info, self.path)

    def encode_header(self, size: int | None) -> bytes:
        entries = [] if self.envelope.hidden else [dict(e.info) for e in self.entries]
        return _header_bytes(self.envelope, entries, self.metadata(), size)

    def metadata(self) -> dict[str, str]:
        md = self.index.get("metadata") or {}
        return dict(md)

    def tensor_info(self, name: str) -> tuple[str, list[int]]:
        e = self.entry(name)
        return e.info["dtype"], list(e.info["shape"])
