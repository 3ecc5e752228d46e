"""What sealed safetensors and sealed bundles share: ``header | payload | tags``.

The payload holds every entry's ciphertext at the entry's own offset (so a sealed safetensors file
keeps its tensors where they were); the tag region holds one 16-byte GCM tag per segment, in entry
order then segment order. The two formats differ only in how the header embeds the envelope
(``safetensors.py``, ``bundle.py``); writing, reading and verifying the payload live here.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from modelseal import atomicfile
from modelseal.crypto import keys
from modelseal.crypto.parallel import run_all, worker_count
from modelseal.crypto.segments import TAG_SIZE, Segment, SegmentCipher, plan_entry, segment_count
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, ModelsealError, NotSealedError, SignatureError, UsageError
from modelseal.format import schema
from modelseal.format.envelope import Envelope, EnvelopeBuilder
from modelseal.recipients.base import Identity, Recipient

if TYPE_CHECKING:  # signing (Ed25519, key files) is imported by the writer and the signature check only
    from modelseal.crypto.signing import Signer

Progress = Callable[[int], None]
Prepare = Callable[[memoryview], None]
"""A loader's hook, called on a decryption worker with each destination range just before it fills it.

How fresh memory gets its pages (``memory/arena.py`` maps them in one system call, interleaved with
decryption on every core) is the caller's decision: it owns the buffers. The format only offers the moment.
"""


@dataclass(frozen=True)
class Entry:
    """One tensor or file: its name, where its bytes lie in the payload, and its descriptive fields."""

    ordinal: int
    name: str
    begin: int
    end: int
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def length(self) -> int:
        return self.end - self.begin


def entries_from_index(index: dict[str, Any], payload_size: int, source: str) -> list[Entry]:
    """Validate the index entries (typed fields, names unique, offsets contiguous inside the payload)."""
    out: list[Entry] = []
    seen: set[str] = set()
    pos = 0
    for i, raw in enumerate(index["entries"]):
        what = f"{source}: index entry {i}"
        schema.obj(raw, what)
        name = schema.string(raw.get("name"), f"{what} name")
        begin, end = schema.offsets(raw.get("offsets"), f"{what} ({name[:80]!r}) offsets")
        if begin != pos or end > payload_size:
            raise FormatError(f"{source}: index entry {name[:80]!r} has offsets outside the payload or out of order")
        if name in seen:
            raise FormatError(f"{source}: duplicate entry name {name[:80]!r}")
        seen.add(name)
        out.append(Entry(i, name, begin, end, raw))
        pos = end
    if pos != payload_size:
        raise FormatError(f"{source}: the index does not cover the payload")
    return out


@contextmanager
def naming(path: str) -> Iterator[None]:
    """Make a modelseal error raised inside name ``path`` (which member of a sealed directory failed).

    Some errors come from layers that do not know the file (a segment's tag, a recipient stanza);
    the same exception object is re-raised with the path in front, keeping its type and fields.
    """
    try:
        yield
    except ModelsealError as exc:
        if exc.args and isinstance(exc.args[0], str) and path not in exc.args[0]:
            exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
        raise


def plan_segments(entries: list[Entry], segment_size: int) -> dict[str, list[Segment]]:
    """Every entry's segments, with tag indices counted across the artifact in entry order."""
    plans: dict[str, list[Segment]] = {}
    tag = 0
    for e in entries:
        plans[e.name] = plan_entry(e.ordinal, e.name, e.begin, e.length, segment_size, tag)
        tag += len(plans[e.name])
    return plans


def total_tags(entries: list[Entry], segment_size: int) -> int:
    return sum(segment_count(e.length, segment_size) for e in entries)


# --------------------------------------------------------------------------------------------- writing

HeaderCodec = Callable[[Envelope, int | None], bytes]
PlainReader = Callable[[int, int], "bytes | memoryview"]


@dataclass
class SealRequest:
    """Everything needed to write one artifact's payload behind a header."""

    builder: EnvelopeBuilder
    entries: list[Entry]
    index: dict[str, Any]
    read_plain: PlainReader  # (payload offset, length) -> plaintext bytes
    recipients: list[Recipient]
    hidden: bool
    signer: Signer | None = None
    group: dict[str, Any] | None = None


WriteAt = Callable[[bytes | bytearray | memoryview, int], None]


class Destination(Protocol):
    """Where :func:`write_artifact` puts an artifact that is not a local file (an object-store upload,
    ``modelseal.sealing.remote``). The format only hands it bytes at offsets; how they are published,
    all or nothing, is the destination's business."""

    def write(self, size: int, fill: Callable[[WriteAt], None]) -> None:
        """Call ``fill(write_at)``, which writes every byte of ``[0, size)`` exactly once (the header's
        bytes may be written again at the end, when a signature fills them in); then publish the
        artifact whole, or, if anything raises, nothing at all (and re-raise)."""
        ...


def write_artifact(
    dst: str | os.PathLike[str] | Destination,
    req: SealRequest,
    header: HeaderCodec,
    progress: Progress | None = None,
) -> Envelope:
    """Encrypt the payload segment by segment into ``dst`` (atomically), in bounded memory, in parallel."""
    if not req.recipients:
        raise UsageError("at least one recipient is needed, or nobody could ever open the artifact")
    from modelseal.crypto.signing import content_digest, segment_digest, signed_message

    seg_size = req.builder.segment_size
    payload_size = req.entries[-1].end if req.entries else 0
    tag_count = total_tags(req.entries, seg_size)
    env = req.builder.build(
        req.index,
        hidden=req.hidden,
        payload_size=payload_size,
        tag_count=tag_count,
        recipients=req.recipients,
        group=req.group,
    )
    if req.signer is not None:
        env.signature = {"signer": req.signer.public, "sig": b64e(bytes(64))}  # placeholder of final size
    head = header(env, None)
    offset = len(head)
    cipher = SegmentCipher(req.builder.payload_key(), req.builder.model_id, req.builder.model_version)
    tags = bytearray(tag_count * TAG_SIZE)
    digests: list[bytes] = [b""] * tag_count
    segments = [s for plan in plan_segments(req.entries, seg_size).values() for s in plan]

    def fill_with(write_at: WriteAt, written: Callable[[int, int], None]) -> None:
        write_at(head, 0)
        pending = iter(segments)
        lock = threading.Lock()

        def seal_segments(stop: threading.Event) -> None:
            """One worker: take the next segment, encrypt it into this worker's buffer, write it, repeat."""
            out = memoryview(bytearray(min(seg_size, payload_size) + TAG_SIZE))  # ciphertext only, never plaintext
            while not stop.is_set():
                with lock:
                    seg = next(pending, None)
                if seg is None:
                    return
                sealed = cipher.encrypt_into(seg, req.read_plain(seg.offset, seg.length), out)
                ct, tag = sealed[: seg.length], sealed[seg.length :]
                write_at(ct, offset + seg.offset)
                written(offset + seg.offset, seg.length)
                tags[seg.tag_index * TAG_SIZE : (seg.tag_index + 1) * TAG_SIZE] = tag
                if req.signer is not None:
                    digests[seg.tag_index] = segment_digest(ct, bytes(tag))
                if progress:
                    progress(seg.length)

        in_parallel(min(worker_count(), max(1, len(segments))), seal_segments)
        write_at(bytes(tags), offset + payload_size)
        if req.signer is not None:
            sig = req.signer.sign(signed_message(env.protected_raw, content_digest(digests)))
            env.signature = {"signer": req.signer.public, "sig": b64e(sig)}
            write_at(header(env, len(head)), 0)

    if not isinstance(dst, str | os.PathLike):
        dst.write(offset + payload_size + len(tags), lambda write_at: fill_with(write_at, lambda _at, _n: None))
        return env

    def fill(fd: int) -> None:
        writeback = atomicfile.Writeback(fd, offset, payload_size)
        fill_with(lambda data, at: atomicfile.pwrite_all(fd, data, at), writeback.written)

    # the caller decides whether an existing output may be replaced (``seal(force=...)``)
    atomicfile.write_file(Path(dst), atomicfile.default_mode(), fill, overwrite=True)
    return env


def in_parallel(count: int, work: Callable[[threading.Event], None]) -> None:
    """Run ``work(stop)`` on ``count`` threads, the calling thread being one of them, until every one returns.

    Each ``work`` takes items from a shared source until it is empty or ``stop`` is set: a pipeline with
    no barrier between batches, which keeps every core busy to the last segment. The first failure (an
    exception in any thread, or Ctrl-C in the calling one) sets ``stop``, so the others finish the segment
    in hand and return. This returns or raises only once every thread has stopped: the caller closes and
    removes the file they write into next, and no thread may write into a closed descriptor (its number
    could already name another file). With one worker nothing is started: the work, and any progress
    callback, run on the calling thread, where signals land.
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, name=f"modelseal-seal-{i}", daemon=True) for i in range(count - 1)]
    try:
        for t in threads:
            t.start()
        work(stop)
    except BaseException:
        stop.set()
        raise
    finally:
        _join(threads, stop)
    if errors:
        raise errors[0]


def _join(threads: list[threading.Thread], stop: threading.Event) -> None:
    """Wait for every started thread, even through Ctrl-C (which stops them and is raised afterwards)."""
    interrupted: BaseException | None = None
    for t in threads:
        while t.ident is not None and t.is_alive():
            try:
                t.join()
            except KeyboardInterrupt as exc:
                stop.set()
                interrupted = exc
    if interrupted is not None:
        raise interrupted


# --------------------------------------------------------------------------------------------- reading

def _warm_aes_gcm() -> None:
    """Make one AES-GCM context at import. OpenSSL fetches and initialises the algorithm on first use,
    which measured 2.5 ms here: paid inside the first load it was the largest part of a small load's fixed
    cost; paid once per process at import, it is not paid by any load."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # loaded by segments.py already

    Cipher(algorithms.AES(bytes(32)), modes.GCM(bytes(12), bytes(16))).decryptor()


class ByteSource(Protocol):
    """Where a sealed artifact's bytes come from: a local file (:class:`SourceFile`) or a remote object
    (``modelseal.load.remote``, ranged HTTP and S3 reads). The format never learns which.

    Small regions (the header, the tag region: a few KiB per GiB of weights) are read whole with
    :meth:`region`; the payload only ever with :meth:`read_into` / :meth:`read_parts`, straight into the
    buffer the caller decrypts in, so no source holds a copy of the ciphertext.
    """

    path: str
    """What messages call it (a file path or a URL without credentials)."""

    @property
    def size(self) -> int:
        """Total bytes of the artifact."""
        ...

    @property
    def part_size(self) -> int | None:
        """Bytes one :meth:`read_parts` call should cover (whole segments are grouped up to it); None reads
        segment by segment with :meth:`read_into` (a local file, where a read costs no round trip)."""
        ...

    @property
    def workers(self) -> int | None:
        """How many reads to run at once; None: one per core (see ``crypto.parallel``)."""
        ...

    def region(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``, cut short at the end of the artifact (headers, tags)."""
        ...

    def read_into(self, out: memoryview, offset: int) -> None:
        """Fill ``out`` from ``offset``, exactly, or raise."""
        ...

    def read_parts(self, offset: int, outs: Sequence[memoryview], done: Callable[[int], None]) -> None:
        """Fill the buffers ``outs``, which hold consecutive bytes from ``offset``, in order, and call
        ``done(i)`` as soon as ``outs[i]`` is complete (the caller decrypts it while the rest arrives)."""
        ...

    def close(self) -> None: ...


class Artifact:
    """A sealed artifact opened read-only (see :class:`ByteSource`); decrypts entries on demand.

    Construction parses and validates the header without a key; :meth:`unlock` unwraps the data key
    and authenticates the header; then entries can be decrypted into caller buffers.
    """

    def __init__(self, path: str | os.PathLike[str], envelope: Envelope, payload_offset: int, src: ByteSource) -> None:
        self.path = str(path)
        self.envelope = envelope
        self.payload_offset = payload_offset
        self._src = src
        p = envelope.protected
        self.segment_size: int = p["segment_size"]
        self.payload_size: int = p["payload_size"]
        self.tag_count: int = p["tag_count"]
        expected = payload_offset + self.payload_size + self.tag_count * TAG_SIZE
        if src.size < expected:
            raise FormatError(f"{self.path} is truncated: expected {expected} bytes, found {src.size}")
        if src.size > expected:
            raise FormatError(f"{self.path} has {src.size - expected} unexpected trailing bytes (appended data?)")
        self._dek: bytearray | None = None
        self._cipher: SegmentCipher | None = None
        self._entries: list[Entry] | None = None
        self._first_tag: dict[str, int] = {}  # per entry; segments are planned on first use
        self._plans: dict[str, list[Segment]] = {}
        self._tags: bytes | None = None  # the tag region, read once before the first segment
        self.index: dict[str, Any] = {}
        if not envelope.hidden:
            self._load_index(envelope.protected["index"])

    # -- keys
    def unlock(self, identity: Identity, dek_cache: dict[bytes, bytearray] | None = None) -> None:
        """Unwrap the data key with ``identity`` and authenticate the header."""
        with naming(self.path):
            dek = bytearray(self.envelope.unwrap(identity, self.path, dek_cache))  # own copy: close() wipes it
            self._dek = dek
            self._cipher = SegmentCipher(
                keys.derive(dek, self.envelope.artifact_id, keys.PURPOSE_PAYLOAD),
                self.envelope.model_id,
                self.envelope.model_version,
            )
            if self.envelope.hidden:
                self._load_index(self.envelope.index(dek, self.path))

    @property
    def dek(self) -> bytearray:
        if self._dek is None:
            raise UsageError("artifact is locked: call unlock() with an identity first")
        return self._dek

    def _load_index(self, index: dict[str, Any]) -> None:
        self.index = index
        self._entries = entries_from_index(index, self.payload_size, self.path)
        self._first_tag, tag = {}, 0
        for e in self._entries:
            self._first_tag[e.name] = tag
            tag += segment_count(e.length, self.segment_size)
        self._plans = {}
        if tag != self.tag_count:
            raise FormatError(f"{self.path}: tag count does not match the index")

    def plan(self, entry: Entry) -> list[Segment]:
        """The segments of one entry (planned when first needed: opening a file of thousands of
        tensors to read one of them should not cut all of them into segments)."""
        plan = self._plans.get(entry.name)
        if plan is None:
            first = self._first_tag[entry.name]
            plan = plan_entry(entry.ordinal, entry.name, entry.begin, entry.length, self.segment_size, first)
            self._plans[entry.name] = plan
        return plan

    def _all_segments(self) -> list[Segment]:
        return [s for e in (self._entries or []) for s in self.plan(e)]

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            raise UsageError("the index of this artifact is hidden: unlock() it with an identity first")
        return self._entries

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise UsageError(f"{self.path} has no entry named {name!r}")

    # -- payload access
    def _read_tags(self) -> None:
        """Read the tag region (one read; 16 bytes per segment) before any segment is decrypted.

        Called on the caller's thread before work is handed to the pool, so workers only read it.
        """
        if self._tags is None:
            start, length = self.payload_offset + self.payload_size, self.tag_count * TAG_SIZE
            tags = self._src.region(start, length)
            if len(tags) != length:
                raise FormatError(f"{self.path} is shorter than its header says (was it truncated?)")
            self._tags = tags

    def _tag(self, seg: Segment) -> bytes:
        if self._tags is None:
            self._read_tags()
        assert self._tags is not None
        return self._tags[seg.tag_index * TAG_SIZE : (seg.tag_index + 1) * TAG_SIZE]

    def _decrypt(self, cipher: SegmentCipher, seg: Segment, out: memoryview, prepare: Prepare | None = None) -> None:
        """Read one segment's ciphertext into ``out`` and decrypt it there (see ``segments.py``)."""
        if prepare is not None:
            prepare(out)
        self._src.read_into(out, self.payload_offset + seg.offset)
        cipher.decrypt_in_place(seg, out, self._tag(seg))

    def decrypt_many(
        self, jobs: list[tuple[Entry, memoryview]], progress: Progress | None = None, prepare: Prepare | None = None
    ) -> None:
        """Decrypt entries into their destination buffers on all cores; on any failure wipe them all."""
        for entry, out in jobs:
            if len(out) != entry.length:
                raise UsageError(f"buffer for {entry.name!r} has {len(out)} bytes, the entry has {entry.length}")
        self.decrypt_ranges([(entry, 0, entry.length, out) for entry, out in jobs], progress, prepare)

    def decrypt_ranges(
        self,
        jobs: list[tuple[Entry, int, int, memoryview]],
        progress: Progress | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        """Decrypt bytes ``[lo, hi)`` of each entry into its buffer, on all cores; wipe all on failure.

        Only the segments overlapping a range are read. Whole segments decrypt straight into the
        destination (``prepare``, if given, readies each one first); a segment the range cuts is
        decrypted (and authenticated) whole into a scratch buffer, which is wiped after its needed
        part is copied out. A source with a ``part_size`` (a remote one) reads runs of consecutive
        whole segments with one request each, decrypting every segment as soon as it has arrived.
        """
        cipher = self._cipher
        if cipher is None:
            raise UsageError("artifact is locked: call unlock() with an identity first")
        work: list[tuple[Segment, memoryview, int]] = []  # segment, where its wanted bytes go, first wanted
        for entry, lo, hi, out in jobs:
            if not 0 <= lo <= hi <= entry.length or len(out) != hi - lo:
                raise UsageError(f"range [{lo}, {hi}) of {entry.name!r} does not fit the entry or its buffer")
            for seg in self.plan(entry):
                start = seg.offset - entry.begin
                a, b = max(lo, start), min(hi, start + seg.length)
                if a < b or (lo == hi == start == 0 and seg.length == 0):
                    work.append((seg, out[a - lo : b - lo], a - start))
        local = threading.local()

        def one(item: tuple[Segment, memoryview, int]) -> None:
            seg, out, skip = item
            if len(out) == seg.length:
                self._decrypt(cipher, seg, out, prepare)
                return
            scratch = memoryview(self._scratch(local, seg.length))[: seg.length]
            try:
                self._decrypt(cipher, seg, scratch)
                out[:] = scratch[skip : skip + len(out)]
            finally:
                keys.wipe(scratch)
                scratch.release()

        def part(items: list[tuple[Segment, memoryview, int]]) -> None:
            if len(items) == 1:
                one(items[0])
                return
            outs = [out for _seg, out, _skip in items]
            if prepare is not None:
                for out in outs:
                    prepare(out)

            def done(i: int) -> None:
                seg, out, _skip = items[i]
                cipher.decrypt_in_place(seg, out, self._tag(seg))

            self._src.read_parts(self.payload_offset + items[0][0].offset, outs, done)

        try:
            with naming(self.path):
                if work:
                    self._read_tags()
                run_all(
                    part,
                    _group(work, self._src.part_size),
                    (lambda items: progress(sum(len(i[1]) for i in items))) if progress else None,
                    workers=self._src.workers,
                )
        except BaseException:
            for *_range, out in jobs:
                keys.wipe(out)
            raise

    def _scratch(self, local: threading.local, size: int) -> bytearray:
        """This thread's buffer of at least ``size`` bytes, for segments that are decrypted but not kept.

        It grows to the largest segment actually met, not ``segment_size``: a header may declare 1 GiB
        segments for a file of a few bytes, and memory must follow the file, not the claim.
        """
        buf: bytearray | None = getattr(local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                keys.wipe(buf)
            buf = local.buf = bytearray(size)
        return buf

    @contextmanager
    def _view(self, seg: Segment) -> Iterator[memoryview]:
        """One segment's ciphertext: a view of the mapping of a local file, else read into a buffer."""
        src = self._src
        if isinstance(src, SourceFile):
            start = self.payload_offset + seg.offset
            view = memoryview(src.mm)[start : start + seg.length]
            try:
                yield view
            finally:
                view.release()
                src.release(start, seg.length)
            return
        buf = bytearray(seg.length)
        with memoryview(buf) as view:
            src.read_into(view, self.payload_offset + seg.offset)
            yield view

    def iter_chunks(self, name: str) -> Iterator[memoryview]:
        """Stream one entry, one authenticated segment at a time, in bounded memory.

        The yielded view is reused (and finally wiped): consume it before the next iteration.
        """
        entry = self.entry(name)
        cipher = self._cipher
        if cipher is None:
            raise UsageError("artifact is locked: call unlock() with an identity first")
        with naming(self.path):
            self._read_tags()
        buf = bytearray(min(self.segment_size, entry.length))  # the entry's size bounds it, not the header's claim
        view = memoryview(buf)
        try:
            for s in self.plan(entry):
                out = view[: s.length]
                with naming(self.path):
                    self._decrypt(cipher, s, out)
                yield out
        finally:
            keys.wipe(buf)

    def verify_payload(self, progress: Progress | None = None) -> None:
        """Authenticate every segment, decrypting into per-thread scratch buffers that are then wiped."""
        cipher = self._cipher
        if cipher is None:
            raise UsageError("artifact is locked: call unlock() with an identity first")
        local = threading.local()

        def one(seg: Segment) -> None:
            out = memoryview(self._scratch(local, seg.length))[: seg.length]
            try:
                self._decrypt(cipher, seg, out)
            finally:
                keys.wipe(out)
                out.release()

        with naming(self.path):
            self._read_tags()
            tick = (lambda s: progress(s.length)) if progress else None
            run_all(one, self._all_segments(), tick, workers=self._src.workers)

    def verify_signature(self, trusted: list[str], progress: Progress | None = None) -> str:
        """Check the publisher signature against ``trusted`` keys; needs no data key. Returns the signer."""
        from modelseal.crypto import signing

        sig = self.envelope.signature
        if sig is None:
            raise SignatureError(f"{self.path} is not signed, but a trusted signer was required")
        digests: list[bytes] = [b""] * self.tag_count
        # Segment boundaries come from the index: the public one, or the hidden one once unlocked.
        segments = self._all_segments()
        if not segments and self.tag_count:
            raise UsageError("the index of this artifact is hidden: unlock() it to check the signature")
        with naming(self.path):
            self._read_tags()

        def one(seg: Segment) -> None:
            with self._view(seg) as ct:
                digests[seg.tag_index] = signing.segment_digest(ct, self._tag(seg))

        with naming(self.path):
            run_all(one, segments, (lambda s: progress(s.length)) if progress else None, workers=self._src.workers)
            signing.verify(
                sig["signer"],
                b64d(sig["sig"], what="signature", length=64),
                signing.signed_message(self.envelope.protected_raw, signing.content_digest(digests)),
                trusted,
            )
        return sig["signer"]

    # -- rewriting the header (rekey)
    def encode_header(self, size: int | None) -> bytes:
        """This artifact's header for its current envelope, padded to ``size`` bytes (None: the size a
        newly sealed file would get); :class:`FormatError` when it does not fit. Each kind defines it."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode its header")

    def rewrite_header(self) -> bool:
        """Write the header again for the current envelope (after its recipients changed); True if in place.

        The new header goes into the space reserved for it at sealing time when it fits: one write, the
        ciphertext untouched. Otherwise the file is replaced atomically by a larger header followed by
        the same ciphertext and tags. Either way the payload is unchanged, so a publisher signature
        (it covers the protected header and the ciphertext, not the stanzas) stays valid. After a
        move this object still reads the old file: close it and open the path again to read on.
        """
        src = self._src
        if not isinstance(src, SourceFile):
            raise UsageError(f"{self.path} is remote: rewrite its header on a local copy and upload that")
        try:
            head = self.encode_header(self.payload_offset)
        except FormatError:  # the reserved space is too small for the new stanzas
            head = b""
        if head:
            atomicfile.overwrite_at(self.path, 0, head, same_as=src.fd)  # this file, not a swap
            return True
        head = self.encode_header(None)
        end = self.payload_offset + self.payload_size + self.tag_count * TAG_SIZE

        def fill(fd: int) -> None:
            atomicfile.write_all(fd, head)
            chunk = bytearray(max(1, min(end - self.payload_offset, 16 << 20)))
            for pos in range(self.payload_offset, end, len(chunk)):
                part = memoryview(chunk)[: min(len(chunk), end - pos)]
                src.read_into(part, pos)  # the opened file: a file shrinking meanwhile is an error
                atomicfile.write_all(fd, part)

        atomicfile.write_file(self.path, os.fstat(src.fd).st_mode & 0o7777, fill, overwrite=True)
        return False

    def close(self) -> None:
        if self._dek is not None:
            keys.wipe(self._dek)
            self._dek = None
        self._cipher = None
        self._src.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Work = tuple[Segment, memoryview, int]  # a segment, where its wanted bytes go, its first wanted byte


def _group(work: list[_Work], part_size: int | None) -> list[list[_Work]]:
    """Runs of whole, consecutive segments of at most ``part_size`` bytes (one read request each).

    A segment cut by a slice stays alone (it is decrypted in scratch memory); without a part size (a
    local file) every segment is its own read, as ``pread`` costs no round trip.
    """
    if not part_size:
        return [[item] for item in work]
    parts: list[list[_Work]] = []
    run: list[_Work] = []
    size = 0
    for item in work:
        seg, out, _skip = item
        whole = len(out) == seg.length
        follows = bool(run) and run[-1][0].offset + run[-1][0].length == seg.offset
        if run and (not whole or not follows or size + seg.length > part_size):
            parts.append(run)
            run, size = [], 0
        run.append(item)
        size += seg.length
        if not whole:
            parts.append(run)
            run, size = [], 0
    if run:
        parts.append(run)
    return parts


@dataclass
class SourceFile:
    """A sealed file held open as a descriptor, read with ``pread``; mapped only for a signature pass.

    Bulk decryption reads through the descriptor straight into the destination buffers: the kernel
    copies from the page cache, the file is never mapped page by page into the process (its peak
    memory is the tensors, not tensors plus file), and a failing disk is an error, not a SIGBUS. The
    header and tags are small reads too; only :meth:`Artifact.verify_signature` hashes the ciphertext
    in place through a mapping, made on first use (mapping and unmapping cost a small load more than
    its header reads).
    """

    path: str
    fd: int
    size: int
    part_size: int | None = None  # pread costs no round trip: segment by segment
    workers: int | None = None  # one per core
    _mm: mmap.mmap | None = None

    @property
    def mm(self) -> mmap.mmap:
        """The whole file mapped read-only (made on first use)."""
        if self._mm is None:
            try:
                self._mm = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise UsageError(f"cannot read {self.path}: {exc.strerror}") from None
        return self._mm

    def region(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        with memoryview(buf) as view:
            got = self._fill(view, offset)  # short only if the file shrank since it was opened
        return bytes(buf[:got])

    def read_into(self, out: memoryview, offset: int) -> None:
        """Fill ``out`` from ``offset`` of the file."""
        if self._fill(out, offset) < len(out):
            raise FormatError(f"{self.path} is shorter than its header says (was it truncated?)")

    def _fill(self, out: memoryview, offset: int) -> int:
        """Read into ``out`` from ``offset`` until it is full or the file ends; the bytes read."""
        pos = 0
        try:
            while pos < len(out):
                got = os.preadv(self.fd, [out[pos:]], offset + pos)
                if got == 0:
                    break
                pos += got
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror}") from None
        return pos

    def read_parts(self, offset: int, outs: Sequence[memoryview], done: Callable[[int], None]) -> None:
        for i, out in enumerate(outs):
            self.read_into(out, offset)
            offset += len(out)
            done(i)

    def release(self, start: int, length: int) -> None:
        """Unmap a hashed range's pages from this process (the signature pass).

        The pages stay in the page cache; only this mapping lets go of them, so checking a signature
        does not leave the whole file counted in the process's memory. Pages shared with a
        neighbouring segment stay mapped; a later read of the range faults them back in.
        """
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and self._mm is not None:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            except (AttributeError, OSError):  # pragma: no cover - platforms without madvise
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the mapping closes when it is released
                pass


def map_file(path: str | os.PathLike[str]) -> SourceFile:
    """Open a sealed file for reading, once: everything after this reads the descriptor it checked.

    Opened without blocking (a FIFO or device swapped in would otherwise hang the open), then refused
    unless it is a regular, non-empty file; an unreadable path is one clear error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"{path} is a directory; use the directory loaders")
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{path} is not a sealed modelseal file (not a regular file)")
        if info.st_size == 0:
            raise NotSealedError(f"{path} is not a sealed modelseal file (it is empty)")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, ModelsealError):
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        raise
    return SourceFile(str(path), fd, info.st_size)


_warm_aes_gcm()
