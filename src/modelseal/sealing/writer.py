"""``seal()``: one entry point that picks the right container for any source.

* ``*.safetensors``: sealed safetensors (per-tensor, in place).
* ``*.pt``/``*.pth``/``*.bin``: converted in memory (``weights_only=True``) to safetensors, then sealed.
* a directory: every file sealed under the same relative path (safetensors per tensor, the rest as
  bundles), all bound into one group.
* anything else (ONNX, TorchScript, configs...): a sealed bundle. ``as_bundle=True`` forces this.

With ``fingerprint=`` the tensors are marked for one licence (``sealing/fingerprint.py``) in a private
in-memory copy of the plaintext, between reading the source and encrypting it: no marked plaintext is
written anywhere. Only tensor sources can carry the mark.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal import atomicfile
from modelseal.crypto import keys
from modelseal.crypto.segments import DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE
from modelseal.crypto.signing import Signer
from modelseal.errors import UsageError
from modelseal.format import bundle, directory
from modelseal.format import safetensors as sst
from modelseal.format.container import Progress
from modelseal.format.envelope import EnvelopeBuilder, check_id
from modelseal.load.remote import is_remote
from modelseal.recipients import parse_recipient
from modelseal.recipients.base import Recipient

if TYPE_CHECKING:
    from modelseal.sealing.fingerprint import Fingerprint
    from modelseal.sealing.remote import MultipartUpload

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
# Weights a directory would seal as bundles, unmarked: a fingerprinted directory refuses them.
_OTHER_WEIGHTS = (".safetensors", *CHECKPOINT_SUFFIXES, ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack", ".npz", ".npy")


@dataclass
class SealResult:
    """What was written: one row per output file."""

    outputs: list[dict[str, object]]
    model_id: str
    model_version: str


@dataclass
class _Job:
    """The settings every file of one ``seal()`` call shares (one DEK for a whole directory)."""

    recipients: list[Recipient]
    dek: bytearray
    model_id: str
    model_version: str
    hidden: bool
    signer: Signer | None
    segment_size: int
    progress: Progress | None
    fingerprint: Fingerprint | None = None

    def builder(self, kind: str) -> EnvelopeBuilder:
        return EnvelopeBuilder(kind, self.model_id, self.model_version, self.segment_size, self.dek)


def _recipients(recipients: Sequence[Recipient | str]) -> list[Recipient]:
    out = [parse_recipient(r) if isinstance(r, str) else r for r in recipients]
    if not out:
        raise UsageError("no recipient given: pass at least one -r RECIPIENT (or a passphrase)")
    return out


def plan_size(src: Path) -> int:
    """Bytes that sealing ``src`` will encrypt (for progress bars)."""
    if src.is_dir():
        return sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    return src.stat().st_size


def seal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    recipients: Sequence[Recipient | str],
    *,
    model_id: str | None = None,
    model_version: str = "1",
    hide_header: bool = False,
    signer: Signer | str | os.PathLike[str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    as_bundle: bool = False,
    progress: Progress | None = None,
    force: bool = False,
    fingerprint: Fingerprint | None = None,
) -> SealResult:
    """Seal ``src`` (file or directory) into ``dst`` for ``recipients``; see the module docstring.

    ``dst``'s directory must exist; an existing ``dst`` is replaced only with ``force`` (an empty
    directory may receive a sealed directory). A directory is sealed all or nothing. ``dst`` may be an
    ``s3://bucket/key`` URL (a string), or ``s3://bucket/prefix/`` for a directory: uploaded as it is
    sealed, never on disk (``sealing/remote.py``). ``fingerprint``: mark the weights for one licence.
    """
    url = dst if is_remote(dst) else None  # s3://bucket/key: sealing/remote.py (before Path folds its //)
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if url is None:
        atomicfile.check_apart(src, dst)
        atomicfile.check_target(dst, want_dir=src.is_dir(), overwrite=force)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise UsageError(f"segment size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes")
    model_id = check_id(model_id or src.name.split(".")[0] or "model", "model id")
    check_id(model_version, "model version")
    if isinstance(signer, (str, os.PathLike)):
        signer = Signer.load(signer)
    if fingerprint is not None:
        _check_fingerprintable(src, as_bundle)
    recips = _recipients(recipients)
    job = _Job(
        recips, keys.new_dek(), model_id, model_version, hide_header, signer, segment_size, progress, fingerprint
    )
    try:
        if url is not None:
            from modelseal.sealing.remote import seal_to_url

            outputs = seal_to_url(src, str(url), job, as_bundle, force)
        elif src.is_dir():
            outputs = _seal_dir(src, dst, job, force)
        else:
            outputs = [_seal_file(src, dst, job, as_bundle, None)]
    finally:
        keys.wipe(job.dek)
    return SealResult(outputs, model_id, model_version)


def _check_fingerprintable(src: Path, as_bundle: bool) -> None:
    """Refuse, before anything is written, a source whose weights a fingerprint cannot reach."""
    if as_bundle:
        raise UsageError("--as-bundle seals the file as opaque bytes: a fingerprint needs tensors")
    if src.is_dir():
        members = directory.list_members(src)
        opaque = [m for m in members if not m.endswith(".safetensors") and m.lower().endswith(_OTHER_WEIGHTS)]
        if opaque:
            raise UsageError(
                f"{src / opaque[0]}: a directory's files other than .safetensors are sealed as opaque bundles, "
                "which cannot carry a fingerprint; convert the directory's weights to .safetensors first"
            )
        if not any(m.lower().endswith(".safetensors") for m in members):
            raise UsageError(f"{src} holds no .safetensors weights to fingerprint")
    elif not src.name.lower().endswith((".safetensors", *CHECKPOINT_SUFFIXES)):
        raise UsageError(
            f"{src} is not a tensor format (.safetensors, .pt/.pth/.bin or a directory of safetensors): "
            "only tensors can carry a fingerprint"
        )


def _seal_file(
    src: Path, dst: Path | MultipartUpload, job: _Job, as_bundle: bool, group: dict[str, Any] | None
) -> dict[str, object]:
    extra: dict[str, object] = {}
    if not as_bundle and src.name.lower().endswith((".safetensors", *CHECKPOINT_SUFFIXES)):
        kind = "safetensors"
        with _safetensors_bytes(src) as source, _marked(source, job, str(src), extra, group is None) as plain:
            env = sst.seal_buffer(
                plain,
                dst,
                job.recipients,
                builder=job.builder("safetensors"),
                hidden=job.hidden,
                signer=job.signer,
                group=group,
                source=str(src),
                progress=job.progress,
            )
    else:
        kind = "bundle"
        env = bundle.seal_path(
            src,
            dst,
            job.recipients,
            builder=job.builder("bundle"),
            signer=job.signer,
            group=group,
            progress=job.progress,
        )
    return {
        "source": str(src),
        "output": str(dst),
        "kind": kind,
        "artifact_id": env.protected["artifact_id"],
        "hidden_header": env.hidden,
        "signed": env.signature is not None,
        "size": dst.stat().st_size if isinstance(dst, Path) else dst.size,
        **extra,
    }


@contextmanager
def _marked(
    plain: mmap.mmap | bytes | bytearray, job: _Job, source: str, extra: dict[str, object], alone: bool
) -> Iterator[mmap.mmap | bytes | bytearray]:
    """``plain``, or with a fingerprint a private copy marked for the job's licence (wiped afterwards);
    what was marked goes into ``extra`` (the output row). A file sealed ``alone`` must have something
    to mark (a directory must, over all its files: :func:`_seal_dir`)."""
    if job.fingerprint is None:
        yield plain
        return
    from modelseal.sealing import fingerprint

    data = plain if isinstance(plain, bytearray) else bytearray(plain)  # a converted checkpoint is ours already
    try:
        marked = fingerprint.apply(data, job.fingerprint, source)
        if alone and not marked.tensors:
            raise fingerprint.nothing_marked(source)
        extra["fingerprint"] = {
            "licence": job.fingerprint.licence,
            "key_id": job.fingerprint.key.key_id,
            "tensors": marked.tensors,
            "positions": marked.positions,
        }
        yield data
    finally:
        if data is not plain:
            keys.wipe(data)


@contextmanager
def _safetensors_bytes(src: Path) -> Iterator[mmap.mmap | bytes | bytearray]:
    """The plaintext safetensors bytes of ``src``: the file mapped read-only, or a checkpoint converted
    in memory (wiped afterwards)."""
    if src.name.lower().endswith(CHECKPOINT_SUFFIXES):
        from modelseal.sealing.convert import checkpoint_to_safetensors

        data = bytearray(checkpoint_to_safetensors(src))
        try:
            yield data
        finally:
            keys.wipe(data)
        return
    with open(src, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        mm.close()


def _seal_dir(src: Path, dst: Path, job: _Job, force: bool) -> list[dict[str, object]]:
    members = directory.list_members(src)
    if not members:
        raise UsageError(f"{src} contains no files to seal")
    group = directory.new_group(members)
    outputs = []
    with atomicfile.directory(dst, atomicfile.default_mode(directory=True), overwrite=force) as tmp:
        for rel in members:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            row = _seal_file(src / rel, out, job, not rel.endswith(".safetensors"), directory.member_group(group, rel))
            outputs.append({**row, "output": str(dst / rel)})
        if job.fingerprint is not None and not any(_marked_tensors(row) for row in outputs):
            from modelseal.sealing.fingerprint import nothing_marked

            raise nothing_marked(str(src))  # inside the directory's transaction: nothing is left behind
    return outputs


def _marked_tensors(row: dict[str, object]) -> int:
    mark = row.get("fingerprint")
    return int(mark.get("tensors", 0)) if isinstance(mark, dict) else 0
