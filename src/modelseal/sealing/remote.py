"""Sealing straight into object storage: ``seal(MODEL, "s3://bucket/key")``, ``modelseal seal MODEL -o
s3://bucket/key``, and a directory to ``s3://bucket/prefix/`` (docs/remote.md).

The sealed bytes go up by S3 multipart upload while they are produced: the format's sealing pipeline
(``format/container.py``, :class:`~modelseal.format.container.Destination`) encrypts segments on every core
as for a local file, each ciphertext is copied into the part buffer it falls in, and a part is handed to
one of a few uploader threads as soon as all its bytes are in, the first part (which holds the header)
included; with a publisher signature, which is written into the header once every segment has been
hashed, the first part is uploaded once more at the end (the later upload of a part number replaces it).
Nothing is written to disk and only ciphertext leaves the process; the plaintext is read from its file
(mapped) as for a local seal. Memory is bounded: the parts uploading or waiting for an uploader
(``MODELSEAL_REMOTE_CONCURRENCY``, default 4, each ``MODELSEAL_REMOTE_PART_SIZE``), the parts the
encryption workers are filling (about one or two per worker), and the first part.

All or nothing: the object appears only when ``CompleteMultipartUpload`` succeeds, and without ``force``
that call carries ``If-None-Match: *`` (an object written meanwhile by someone else is not replaced). Any
failure (S3 refusing a part, the network, the plaintext unreadable, Ctrl-C, SIGTERM and the other signals
``atomicfile`` guards) aborts the multipart upload, after the part uploads in flight have ended, so no
partial object is ever visible and no parts stay stored. A directory is staged: every member is uploaded
but not completed, then all are completed; a failure before that aborts them all, a failure during the
completions deletes the members already completed (S3 has no multi-object commit: a reader listing the
prefix in that instant can see some members, and the directory loaders refuse an incomplete group).
With ``force``, objects under the prefix that are not members of the new directory are deleted last.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from modelseal import atomicfile
from modelseal.errors import ModelsealError, UsageError
from modelseal.format import directory
from modelseal.format.container import WriteAt
from modelseal.load.remote import display, s3
from modelseal.load.remote.config import UploadSettings, upload_settings

if TYPE_CHECKING:
    from modelseal.sealing.writer import _Job

S3_MIN_PART = 5 << 20  # every part but the last must be at least this long
S3_MAX_PARTS = 10_000


def part_size_for(size: int, wanted: int) -> int:
    """``wanted`` raised to S3's minimum part, and to what keeps ``size`` bytes within 10,000 parts."""
    need = -(-size // S3_MAX_PARTS)
    return max(wanted, S3_MIN_PART, -(-need // (1 << 20)) * (1 << 20))


class MultipartUpload:
    """One object written by multipart upload: the format's :class:`Destination` for ``s3://`` URLs.

    :meth:`write` uploads every part (see the module docstring); the object is published by
    :meth:`complete`, which :meth:`write` calls itself unless ``staged`` (a directory completes all its
    members at the end); :meth:`abort` throws every uploaded part away and may be called at any time,
    any number of times, from any thread or a signal handler.
    """

    def __init__(self, url: str, conf: UploadSettings, *, overwrite: bool, staged: bool = False) -> None:
        self.url = url
        self.bucket, self.key = s3.split(url)
        self._client = s3.client()
        self._conf = conf
        self._overwrite = overwrite
        self._staged = staged
        self.size = 0
        self.upload_id: str | None = None
        self._etags: dict[int, str] = {}
        self._lock = threading.Lock()
        self._done = False

    def __str__(self) -> str:
        return self.url

    # -- the Destination protocol
    def write(self, size: int, fill: Callable[[WriteAt], None]) -> None:
        self.size = size
        part = part_size_for(size, self._conf.part_size)
        try:
            created = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType="application/octet-stream"
            )
        except Exception as exc:  # botocore's errors, explained in one line
            raise s3.explain(self.url, exc) from None
        self.upload_id = str(created["UploadId"])
        try:
            _Parts(self, size, part).run(fill)
            if not self._staged:
                self.complete()
        except BaseException:
            self.abort()
            raise

    # -- the upload's calls
    def upload_part(self, number: int, body: bytearray) -> None:
        try:
            r = self._client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
            )
        except Exception as exc:
            raise _explain_upload(self.url, exc) from None
        with self._lock:
            self._etags[number] = str(r["ETag"])

    def complete(self) -> None:
        """Publish the object: every part, in order (refused if an object appeared there meanwhile, unless
        ``overwrite``)."""
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        extra = {} if self._overwrite else {"IfNoneMatch": "*"}
        try:
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}, **extra
            )
        except Exception as exc:
            self.abort()
            raise _explain_upload(self.url, exc) from None
        self._done = True

    def abort(self) -> None:
        """Throw the upload away (idempotent; a completed object is left alone: see :meth:`delete`)."""
        if self.upload_id is None or self._done:
            return
        with contextlib.suppress(Exception):  # already gone, or the network is down: the lifecycle rule's job
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    def delete(self) -> None:
        """Remove the object this upload published (a directory whose later member failed to complete)."""
        if self._done:
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.bucket, Key=self.key)


def _explain_upload(url: str, exc: Exception) -> UsageError:
    import botocore.exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return UsageError(f"{url} was created by someone else while it was being sealed (pass --force to replace)")
        if code == "NoSuchUpload":
            return UsageError(f"{url}: the multipart upload was aborted while it was being written")
    if isinstance(exc, bx.ClientError | bx.BotoCoreError):
        return s3.explain(url, exc)
    raise exc


class _Parts:
    """The part buffers of one upload, filled at any offset by the sealing workers, uploaded when full."""

    def __init__(self, upload: MultipartUpload, size: int, part: int) -> None:
        self.upload = upload
        self.size = size
        self.smallest = part
        self.part = 0  # set by the first write, the header's: the first part must hold all of it
        self.count = 1
        self.buffers: dict[int, bytearray] = {}
        self.filled: dict[int, int] = {}
        self.free: list[bytearray] = []  # buffers back from uploads: recycled, not freshly faulted (no more are
        # kept than were in use at once, so the bound on memory is unchanged)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(upload._conf.uploads)
        self.pool = ThreadPoolExecutor(upload._conf.uploads, thread_name_prefix="modelseal-upload")
        self.futures: list[Future[None]] = []
        self.failure: BaseException | None = None
        self.first: Future[None] | None = None  # the first part's upload, once submitted
        self.rewritten = False  # the header changed after the first part was submitted: upload it again

    def length(self, k: int) -> int:
        return min(self.part, self.size - k * self.part)

    def run(self, fill: Callable[[WriteAt], None]) -> None:
        try:
            fill(self.write_at)
            missing = [k + 1 for k in range(self.count) if self.filled.get(k, 0) != self.length(k)]
            if missing:  # the format's contract (every byte written once) was broken: never publish
                raise ModelsealError(f"{self.upload.url}: part {missing[0]} was not written whole; nothing uploaded")
            if self.rewritten:
                self.submit(0)  # after its first upload ended (write_at waited for it): this one replaces it
            for f in self.futures:
                f.result()
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)  # parts in flight end before the abort
        if self.failure is not None:
            raise self.failure

    def write_at(self, data: bytes | bytearray | memoryview, at: int) -> None:
        """Copy ``data`` into the parts it covers; each part that is now whole goes to an uploader."""
        with memoryview(data) as mv:
            src = mv.cast("B")
            if not self.part:  # the header, written first, before any worker starts
                self.part = max(self.smallest, -(-len(src) // (1 << 20)) * (1 << 20))
                self.count = max(1, -(-self.size // self.part))
            pos = 0
            while pos < len(src):
                k = (at + pos) // self.part
                start = k * self.part
                n = min(len(src) - pos, start + self.length(k) - (at + pos))
                if k == 0 and self.first is not None:  # the header again (a signature): not while it uploads
                    self.first.result()
                    self.rewritten = True
                with self.lock:
                    self.check()
                    buf = self.buffers.get(k)
                    if buf is None:
                        buf = self.buffers[k] = self.new_buffer(k)
                buf[at + pos - start : at + pos - start + n] = src[pos : pos + n]
                whole = False
                if not (k == 0 and self.rewritten):
                    with self.lock:
                        self.filled[k] = self.filled.get(k, 0) + n
                        whole = self.filled[k] == self.length(k)
                if whole:
                    self.submit(k)
                pos += n

    def new_buffer(self, k: int) -> bytearray:
        if self.length(k) == self.part and self.free:
            return self.free.pop()
        return bytearray(self.length(k))  # botocore takes bytes or a bytearray, not a view: exact length

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def submit(self, k: int) -> None:
        """Hand part ``k`` to an uploader, waiting while every upload slot is taken (back-pressure: the
        uploads never wait for the sealing workers, so a wait always ends)."""
        while not self.slots.acquire(timeout=0.25):
            self.check()
        self.check()
        self.futures.append(self.pool.submit(self.send, k))
        if k == 0:
            self.first = self.futures[-1]

    def send(self, k: int) -> None:
        try:
            if self.failure is None:
                self.upload.upload_part(k + 1, self.buffers[k])
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
            raise
        finally:
            with self.lock:
                buf = self.buffers.pop(k) if k else self.buffers[k]  # the first stays: a signature may follow
                if k and len(buf) == self.part and len(self.free) < self.upload._conf.uploads + 2:
                    self.free.append(buf)
            self.slots.release()


# --------------------------------------------------------------------------------------------- sealing


def seal_to_url(src: Path, url: str, job: _Job, as_bundle: bool, force: bool) -> list[dict[str, object]]:
    """Seal ``src`` (a file, or a directory to a prefix) to ``url`` for ``writer.seal``; its output rows."""
    from modelseal.sealing import writer

    if not url.lower().startswith("s3://"):
        raise UsageError(f"{display(url)}: sealing writes to local paths and s3:// URLs only (not http(s)://)")
    bucket, key = s3.split(url)
    conf = upload_settings()
    if src.is_dir():
        return _seal_tree(src, url if url.endswith("/") else url + "/", job, force, conf)
    if not key or key.endswith("/"):
        raise UsageError(f"{url} names a prefix: give the object's key (s3://{bucket}/path/{src.name}...)")
    if not force and _exists(url):
        raise UsageError(f"{url} already exists (pass --force to replace it)")
    upload = MultipartUpload(url, conf, overwrite=force)
    with _aborting([upload]):
        return [writer._seal_file(src, upload, job, as_bundle, None)]


def _exists(url: str) -> bool:
    import botocore.exceptions as bx

    bucket, key = s3.split(url)
    try:
        s3.client().head_object(Bucket=bucket, Key=key)
    except bx.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise s3.explain(url, exc) from None
    except bx.BotoCoreError as exc:
        raise s3.explain(url, exc) from None
    return True


def _seal_tree(src: Path, base: str, job: _Job, force: bool, conf: UploadSettings) -> list[dict[str, object]]:
    from modelseal.sealing import writer

    members = directory.list_members(src)
    if not members:
        raise UsageError(f"{src} contains no files to seal")
    existing = s3.list_prefix(base)
    if existing and not force:
        raise UsageError(f"{base} already holds {len(existing)} objects (pass --force to replace the directory)")
    group = directory.new_group(members)
    uploads: list[MultipartUpload] = []
    rows = []
    with _aborting(uploads):
        for rel in members:
            upload = MultipartUpload(base + rel, conf, overwrite=force, staged=True)  # If-None-Match unless force
            uploads.append(upload)
            as_bundle = not rel.endswith(".safetensors")
            rows.append(writer._seal_file(src / rel, upload, job, as_bundle, directory.member_group(group, rel)))
        try:
            for upload in uploads:
                upload.complete()
        except BaseException:
            for upload in uploads:
                upload.delete()
            raise
    for stale in sorted(set(existing) - set(members)):  # an older version's files: the group would refuse them
        with contextlib.suppress(Exception):
            s3.client().delete_object(Bucket=uploads[0].bucket, Key=s3.split(base)[1] + stale)
    return rows


@contextlib.contextmanager
def _aborting(uploads: list[MultipartUpload]) -> Iterator[None]:
    """Abort every upload not yet published on any exception, Ctrl-C, or a signal that ends the process
    (through ``atomicfile``'s handlers, which also remove local temporary files)."""

    def abort_all() -> None:
        for u in list(uploads):
            u.abort()

    with atomicfile._tracked(abort_all):
        try:
            yield
        except BaseException:
            abort_all()
            raise
