"""Whole-artifact operations behind the CLI: inspect, verify, open (decrypt to disk), rekey.

Each works on a sealed file or a sealed directory and returns a JSON-ready report.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelseal import atomicfile
from modelseal.crypto.segments import TAG_SIZE
from modelseal.errors import FormatError, ModelsealError, UsageError
from modelseal.format import bundle, directory
from modelseal.format import safetensors as sst
from modelseal.format.container import Artifact, Entry, Progress
from modelseal.format.envelope import dek_context
from modelseal.load.artifacts import open_artifact, open_locked, resolve_identity
from modelseal.recipients import parse_recipient
from modelseal.recipients.base import Recipient, Stanza
from modelseal.recipients.registry import IdentitySpec


def sealed_files(path: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """(root, relative names): one file, or every file of a sealed directory."""
    p = Path(path)
    if p.is_dir():
        members = directory.list_members(p)
        if not members:
            raise UsageError(f"no sealed files in {p}")
        return p, members
    if not p.exists():
        raise UsageError(f"{p} does not exist")
    return p.parent, [p.name]


def payload_bytes(path: str | os.PathLike[str]) -> int:
    root, names = sealed_files(path)
    return sum((root / n).stat().st_size for n in names)


def describe(art: Artifact) -> dict[str, Any]:
    env = art.envelope
    p = env.protected
    out: dict[str, Any] = {
        "file": art.path,
        "kind": p["kind"],
        "format": p["format"],
        "model_id": p["model_id"],
        "model_version": p["model_version"],
        "artifact_id": p["artifact_id"],
        "segment_size": p["segment_size"],
        "payload_bytes": p["payload_size"],
        "segments": p["tag_count"],
        "hidden_index": env.hidden,
        "recipients": [{k: s[k] for k in ("type", "kid", "url", "model", "key_id") if k in s} for s in env.recipients],
        "signer": env.signature["signer"] if env.signature else None,
    }
    if "group" in p:
        out["group"] = {"id": p["group"]["id"], "path": p["group"]["path"], "members": len(p["group"]["members"])}
    if not env.hidden and isinstance(art, sst.SealedSafetensors):
        out["metadata"] = art.metadata()
        out["tensors"] = [{"name": e.name, "dtype": e.info["dtype"], "shape": e.info["shape"]} for e in art.entries]
    return out


def inspect(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Describe sealed files without any key."""
    root, names = sealed_files(path)
    reports = []
    for n in names:
        with open_locked(root / n) as art:
            reports.append(describe(art))
    return reports


def verify(
    path: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Fully authenticate sealed files: header, every segment, directory membership, signature.

    Without an identity only the signature can be checked (``trusted_signers`` required then).
    """
    root, names = sealed_files(path)
    ident = resolve_identity(identity) if identity is not None or not trusted_signers else None
    cache: dict[bytes, bytearray] = {}
    arts: dict[str, Artifact] = {}
    reports = []
    try:
        for n in names:
            art = open_locked(root / n)
            arts[n] = art
            report = {"file": art.path, "payload": "not checked (no identity)", "signature": "not checked"}
            if ident is not None:
                art.unlock(ident, cache)
                art.verify_payload(progress)
                report["payload"] = "authentic"
            if trusted_signers:
                report["signature"] = f"valid, by {art.verify_signature(list(trusted_signers))}"
            reports.append(report)
        if Path(path).is_dir():
            directory.check_group(root, arts)
    finally:
        for a in arts.values():
            a.close()
        directory.wipe_cache(cache)
    return reports


def _write_plain_safetensors(art: sst.SealedSafetensors, out_fd: int, progress: Progress | None) -> None:
    header: dict[str, Any] = {}
    if art.metadata():
        header["__metadata__"] = art.metadata()
    for e in art.entries:
        header[e.name] = {"dtype": e.info["dtype"], "shape": e.info["shape"], "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    atomicfile.write_all(out_fd, struct.pack("<Q", len(raw)) + raw)
    _stream_entries(art, [(e.name, out_fd) for e in art.entries], progress)


def _stream_entries(art: Artifact, targets: list[tuple[str, int]], progress: Progress | None) -> None:
    """Decrypt entries segment by segment (bounded memory) and append them to their target fds."""
    for name, fd in targets:
        for chunk in art.iter_chunks(name):
            atomicfile.write_all(fd, chunk)
            if progress:
                progress(len(chunk))


def open_to_disk(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """The owner's explicit decrypt: write plaintext files (mode 0600, directories 0700).

    All or nothing: a directory output is built in a temporary sibling and renamed into place, so a
    failed check at the last file, a full disk or Ctrl-C leaves no plaintext behind (see
    :mod:`modelseal.atomicfile`).
    """
    src, out = Path(path), Path(output)
    root, names = sealed_files(src)
    atomicfile.check_apart(src, out)
    ident = resolve_identity(identity)
    cache: dict[bytes, bytearray] = {}
    arts: dict[str, Artifact] = {}
    try:
        for n in names:
            arts[n] = open_artifact(root / n, ident, dek_cache=cache)
        if src.is_dir():
            directory.check_group(root, arts)
        if not src.is_dir() and not _is_tree(arts[names[0]]):
            return [str(_extract(arts[names[0]], out, force, progress))]
        with atomicfile.directory(out, overwrite=force) as tmp:
            if src.is_dir():
                for n, art in arts.items():
                    _mkdirs(tmp / n, parents_only=not _is_tree(art))
                    _extract(art, tmp / n, False, progress)
            else:
                _extract(arts[names[0]], tmp, False, progress)
            written = [f.relative_to(tmp) for f in sorted(tmp.rglob("*")) if f.is_file()]
        return [str(out / w) for w in written]
    finally:
        for a in arts.values():
            a.close()
        directory.wipe_cache(cache)


def _is_tree(art: Artifact) -> bool:
    """A bundle of a directory (its plaintext is a tree, not one file)."""
    return isinstance(art, bundle.SealedBundle) and art.index.get("root") != "file"


def _plain_mode(info: dict[str, Any]) -> int:
    """A bundled file's recorded mode, for its owner only: plaintext weights are never group/world-readable."""
    mode = info.get("mode", atomicfile.PRIVATE)
    return (mode if isinstance(mode, int) else 0) & 0o700 | atomicfile.PRIVATE


def _mkdirs(path: Path, parents_only: bool = False) -> None:
    """Create directories inside the output tree being built (fresh, so nothing can be planted in it)."""
    try:
        (path.parent if parents_only else path).mkdir(mode=atomicfile.PRIVATE_DIR, parents=True, exist_ok=True)
    except OSError as exc:
        raise atomicfile.WriteError(f"cannot create {path}: {exc.strerror}") from None


def _streamer(art: Artifact, entry: Entry, progress: Progress | None) -> Callable[[int], None]:
    """A ``fill`` for :func:`atomicfile.write_file` that decrypts one entry into the file."""
    return lambda fd: _stream_entries(art, [(entry.name, fd)], progress)


def _extract(art: Artifact, target: Path, overwrite: bool, progress: Progress | None) -> Path:
    """Write one artifact's plaintext at ``target``: a file, or (a directory bundle) into an existing directory."""
    if isinstance(art, sst.SealedSafetensors):
        return atomicfile.write_file(
            target, atomicfile.PRIVATE, lambda fd: _write_plain_safetensors(art, fd, progress), overwrite=overwrite
        )
    assert isinstance(art, bundle.SealedBundle)
    if not _is_tree(art):
        e = art.entries[0]
        return atomicfile.write_file(target, _plain_mode(e.info), _streamer(art, e, progress), overwrite=overwrite)
    for d in art.index.get("dirs", []):
        _mkdirs(target / d)
    for e in art.entries:
        _mkdirs(target / e.name, parents_only=True)
        atomicfile.write_file(target / e.name, _plain_mode(e.info), _streamer(art, e, progress))
    return target


# ------------------------------------------------------------------------------------------------ rekey


def _matches(recipient: Recipient, stanza: Stanza) -> bool:
    m = getattr(recipient, "matches", None)
    if m is None:
        raise UsageError(f"{recipient.describe()} cannot be matched against stanzas for removal")
    return bool(m(stanza))


def rekey(
    path: str | os.PathLike[str],
    identity: IdentitySpec | None,
    add: Sequence[Recipient | str] = (),
    remove: Sequence[Recipient | str] = (),
) -> list[dict[str, Any]]:
    """Add or remove recipients by rewriting headers only; the ciphertext is not touched.

    Idempotent, so that a rekey of a directory interrupted halfway (a full disk, a signal) is finished
    by running the same command again: a recipient already present is not added twice, a member whose
    stanza is already gone counts as done, and a member with nothing to change is not rewritten.
    """
    adds = [parse_recipient(r) if isinstance(r, str) else r for r in add]
    removes = [parse_recipient(r) if isinstance(r, str) else r for r in remove]
    if not adds and not removes:
        raise UsageError("nothing to do: give --add-recipient and/or --remove-recipient")
    root, names = sealed_files(path)
    ident = resolve_identity(identity)
    cache: dict[bytes, bytearray] = {}
    arts: list[Artifact] = []
    reports = []
    try:
        for n in names:  # every header is prepared (and every check passed) before any file changes
            art = open_artifact(root / n, ident, dek_cache=cache)
            arts.append(art)
            env = art.envelope
            kept = [s for s in env.recipients if not any(_matches(r, s) for r in removes)]
            removed = len(env.recipients) - len(kept)
            new = [r for r in adds if not (hasattr(r, "matches") and any(_matches(r, s) for s in kept))]
            kept += [r.wrap(bytes(art.dek), dek_context(env.artifact_id)) for r in new]
            if not kept:
                raise UsageError(f"{art.path}: refusing to remove every recipient (nobody could open it)")
            env.recipients = kept
            reports.append({"file": art.path, "added": len(new), "removed": removed, "recipients": len(kept)})
        if removes and not any(r["removed"] for r in reports):
            raise UsageError(f"{path}: no stanza matches the recipient(s) to remove")
        done: list[str] = []
        for art, report in zip(arts, reports, strict=True):
            if not (report["added"] or report["removed"]):
                report["rewritten"] = "unchanged (already done)"
                continue
            try:
                report["rewritten"] = "header only" if _rewrite_header(art) else "header moved"
            except ModelsealError as exc:
                if done:  # say what changed, and that running the same command again finishes it
                    exc.args = (f"{exc}; already rewritten: {', '.join(done)}; run the same command again to finish",)
                raise
            done.append(str(art.path))
    finally:
        for a in arts:
            a.close()
        directory.wipe_cache(cache)
    return reports


def _new_header(art: Artifact, size: int | None) -> bytes:
    if isinstance(art, sst.SealedSafetensors):
        entries = [] if art.envelope.hidden else [dict(e.info) for e in art.entries]
        return sst._header_bytes(art.envelope, entries, art.metadata(), size)
    return bundle._header_bytes(art.envelope, size)


def _rewrite_header(art: Artifact) -> bool:
    """Write the new header in the reserved space, or copy the ciphertext behind a larger header."""
    try:
        head = _new_header(art, art.payload_offset)
    except FormatError:  # the reserved space is too small for the new stanzas
        head = b""
    if head:
        try:
            fd = os.open(art.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, head, 0)  # one write of the header's reserved space; the payload is untouched
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise atomicfile.WriteError(f"cannot rewrite the header of {art.path}: {exc.strerror}") from None
        return True
    head = _new_header(art, None)
    end = art.payload_offset + art.payload_size + art.tag_count * TAG_SIZE

    def fill(fd: int) -> None:
        atomicfile.write_all(fd, head)
        with open(art.path, "rb") as src:
            src.seek(art.payload_offset)
            remaining = end - art.payload_offset
            while remaining:
                chunk = src.read(min(remaining, 16 << 20))
                if not chunk:
                    raise FormatError(f"{art.path} shrank while it was being rekeyed")
                atomicfile.write_all(fd, chunk)
                remaining -= len(chunk)

    mode = os.stat(art.path).st_mode & 0o7777
    atomicfile.write_file(art.path, mode, fill, overwrite=True)
    return False
