"""Whole-artifact operations behind the CLI: inspect, verify, open (decrypt to disk), rekey.

Each works on a sealed file or a sealed directory and returns typed results; the CLI formats them
(text and ``--json``). Keys are handled in one place: :func:`modelseal.format.directory.open_directory`
opens the members, shares one data-key cache, checks the directory group, and closes and wipes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from modelseal import atomicfile
from modelseal.errors import ModelsealError, UsageError
from modelseal.format import bundle, directory
from modelseal.format import safetensors as sst
from modelseal.format.container import Artifact, Entry, Progress
from modelseal.format.directory import MemberOpener, open_directory
from modelseal.format.envelope import dek_context
from modelseal.load.artifacts import open_artifact, open_locked, open_sealed_dir, resolve_identity
from modelseal.load.remote import display, is_remote
from modelseal.load.remote.tree import is_remote_dir
from modelseal.recipients import parse_recipient
from modelseal.recipients.base import Identity, Recipient, Stanza
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
    """The bytes of the sealed files at ``path`` (a progress bar's total; 0 for a URL, not fetched here)."""
    if is_remote(path):
        return 0
    root, names = sealed_files(path)
    return sum((root / n).stat().st_size for n in names)


def _unlocking(identity: Identity) -> MemberOpener:
    """Open and unlock each member with ``identity``, sharing the directory's data-key cache."""
    return lambda path, cache: open_artifact(path, identity, dek_cache=cache)


def _open_sealed(path: str | os.PathLike[str], open_member: MemberOpener) -> ContextManager[dict[str, Artifact]]:
    """:func:`open_directory` for a sealed file or a sealed directory (only a directory has a group)."""
    root, names = sealed_files(path)
    return open_directory(root, open_member, members=names, check=Path(path).is_dir())


def _open_any(path: str | os.PathLike[str], open_member: MemberOpener) -> ContextManager[dict[str, Artifact]]:
    """:func:`_open_sealed`, or for a URL (``s3://``, ``https://``; docs/remote.md) the one file or the
    directory under the prefix, checked as its group."""
    if not is_remote(path):
        return _open_sealed(path, open_member)
    if is_remote_dir(str(path)):
        return open_sealed_dir(str(path), open_member)
    return _one(open_member(str(path), {}))


@contextlib.contextmanager
def _one(art: Artifact) -> Iterator[dict[str, Artifact]]:
    try:
        yield {art.path: art}
    finally:
        art.close()


# ---------------------------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class GroupInfo:
    """A directory member's place in its sealed directory."""

    id: str
    path: str
    members: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class ArtifactInfo:
    """What a sealed file's header says, read without any key (``group``, ``metadata`` and ``tensors``
    are None where the file has none or hides them)."""

    file: str
    kind: str
    format: str
    model_id: str
    model_version: str
    artifact_id: str
    segment_size: int
    payload_bytes: int
    segments: int
    hidden_index: bool
    recipients: list[dict[str, Any]]  # each stanza's public fields: type, kid, url, model, key_id
    signer: str | None
    group: GroupInfo | None = None
    metadata: dict[str, str] | None = None
    tensors: list[TensorInfo] | None = None


def describe(art: Artifact) -> ArtifactInfo:
    env = art.envelope
    p = env.protected
    listing = art if isinstance(art, sst.SealedSafetensors) and not env.hidden else None  # tensors shown
    tensors = None
    if listing is not None:
        tensors = [TensorInfo(e.name, e.info["dtype"], e.info["shape"]) for e in listing.entries]
    g = p.get("group")
    return ArtifactInfo(
        file=art.path,
        kind=p["kind"],
        format=p["format"],
        model_id=p["model_id"],
        model_version=p["model_version"],
        artifact_id=p["artifact_id"],
        segment_size=p["segment_size"],
        payload_bytes=p["payload_size"],
        segments=p["tag_count"],
        hidden_index=env.hidden,
        recipients=[{k: s[k] for k in ("type", "kid", "url", "model", "key_id") if k in s} for s in env.recipients],
        signer=env.signature["signer"] if env.signature else None,
        group=GroupInfo(g["id"], g["path"], len(g["members"])) if g is not None else None,
        metadata=listing.metadata() if listing is not None else None,
        tensors=tensors,
    )


def inspect(path: str | os.PathLike[str]) -> list[ArtifactInfo]:
    """Describe sealed files without any key (a URL: one file, or every member of a directory URL)."""
    if is_remote(path):
        with open_sealed_dir(str(path), lambda member, _cache: open_locked(member)) if is_remote_dir(
            str(path)) else _one(open_locked(str(path))) as arts:  # fmt: skip
            return [describe(art) for art in arts.values()]
    root, names = sealed_files(path)
    reports = []
    for n in names:
        with open_locked(root / n) as art:
            reports.append(describe(art))
    return reports


# ----------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    """One authenticated file: whether its payload was checked (it needs a key) and by whom it is signed
    (None: the signature was not checked)."""

    file: str
    payload_checked: bool
    signer: str | None


def verify(
    path: str | os.PathLike[str],
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[VerifyResult]:
    """Fully authenticate sealed files: header, directory membership, every segment, signature.

    Without an identity only the signature can be checked (``trusted_signers`` required then).
    """
    if not is_remote(path):
        sealed_files(path)  # a missing input is reported before the identity is needed
    ident = resolve_identity(identity) if identity is not None or not trusted_signers else None
    opener = _unlocking(ident) if ident is not None else (lambda member, _cache: open_locked(member))
    reports = []
    with _open_any(path, opener) as arts:
        for art in arts.values():
            if ident is not None:
                art.verify_payload(progress)
            signer = art.verify_signature(list(trusted_signers)) if trusted_signers else None
            reports.append(VerifyResult(art.path, ident is not None, signer))
    return reports


# ------------------------------------------------------------------------------------------------- open


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
    if is_remote(path):
        raise UsageError(f"open writes plaintext from a local sealed file or directory, not a URL: fetch "
                         f"{display(str(path))} first (inspect and verify take URLs)")  # fmt: skip
    src, out = Path(path), Path(output)
    sealed_files(src)  # a missing input is reported before anything else
    atomicfile.check_apart(src, out)
    ident = resolve_identity(identity)
    with _open_sealed(src, _unlocking(ident)) as arts:
        if not src.is_dir():
            (art,) = arts.values()
            if not _is_tree(art):
                return [str(_extract(art, out, force, progress))]
        with atomicfile.directory(out, overwrite=force) as tmp:
            if src.is_dir():
                for n, art in arts.items():
                    _mkdirs(tmp / n, parents_only=not _is_tree(art))
                    _extract(art, tmp / n, False, progress)
            else:
                _extract(art, tmp, False, progress)
            written = [f.relative_to(tmp) for f in sorted(tmp.rglob("*")) if f.is_file()]
        return [str(out / w) for w in written]


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


class Rewrite(StrEnum):
    """What rekey did to one file's header."""

    IN_PLACE = "header only"  # written into the space reserved for it; nothing else touched
    MOVED = "header moved"  # the file was rewritten (atomically) behind a larger header
    UNCHANGED = "unchanged (already done)"  # nothing to add or remove


@dataclass
class RekeyResult:
    """One file's recipients after rekey: how many were added and removed, how many it has now."""

    file: str
    added: int
    removed: int
    recipients: int
    rewritten: Rewrite = Rewrite.UNCHANGED


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
) -> list[RekeyResult]:
    """Add or remove recipients by rewriting headers only; the ciphertext is not touched.

    Idempotent, so that a rekey of a directory interrupted halfway (a full disk, a signal) is finished
    by running the same command again: a recipient already present is not added twice, a member whose
    stanza is already gone counts as done, and a member with nothing to change is not rewritten.
    """
    adds = [parse_recipient(r) if isinstance(r, str) else r for r in add]
    removes = [parse_recipient(r) if isinstance(r, str) else r for r in remove]
    if not adds and not removes:
        raise UsageError("nothing to do: give --add-recipient and/or --remove-recipient")
    sealed_files(path)  # a missing input is reported before the identity is needed
    ident = resolve_identity(identity)
    reports: list[RekeyResult] = []
    with _open_sealed(path, _unlocking(ident)) as arts:
        for art in arts.values():  # every header is prepared (and every check passed) before any file changes
            env = art.envelope
            kept = [s for s in env.recipients if not any(_matches(r, s) for r in removes)]
            removed = len(env.recipients) - len(kept)
            new = [r for r in adds if not (hasattr(r, "matches") and any(_matches(r, s) for s in kept))]
            kept += [r.wrap(bytes(art.dek), dek_context(env.artifact_id)) for r in new]
            if not kept:
                raise UsageError(f"{art.path}: refusing to remove every recipient (nobody could open it)")
            env.recipients = kept
            reports.append(RekeyResult(art.path, len(new), removed, len(kept)))
        if removes and not any(r.removed for r in reports):
            raise UsageError(f"{path}: no stanza matches the recipient(s) to remove")
        done: list[str] = []
        for art, report in zip(arts.values(), reports, strict=True):
            if not (report.added or report.removed):
                continue
            try:
                report.rewritten = Rewrite.IN_PLACE if art.rewrite_header() else Rewrite.MOVED
            except ModelsealError as exc:
                if done:  # say what changed, and that running the same command again finishes it
                    exc.args = (f"{exc}; already rewritten: {', '.join(done)}; run the same command again to finish",)
                raise
            done.append(str(art.path))
    return reports
