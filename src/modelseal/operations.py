"""Whole-artifact operations behind the CLI: inspect, verify, open (decrypt to disk), rekey.

Each works on a sealed file or a sealed directory and returns a JSON-ready report.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelseal.artifacts import open_artifact, open_locked, resolve_identity
from modelseal.crypto.segments import TAG_SIZE
from modelseal.errors import FormatError, UsageError
from modelseal.format import bundle, directory
from modelseal.format import safetensors as sst
from modelseal.format.container import Artifact, Progress
from modelseal.format.envelope import dek_context
from modelseal.recipients import parse_recipient
from modelseal.recipients.base import Recipient, Stanza
from modelseal.recipients.parse import IdentitySpec


def sealed_files(path: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """(root, relative names): one file, or every file of a sealed directory."""
    p = Path(path)
    if p.is_dir():
        return p, directory.list_members(p)
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
    os.write(out_fd, struct.pack("<Q", len(raw)) + raw)
    _stream_entries(art, [(e.name, out_fd) for e in art.entries], progress)


def _stream_entries(art: Artifact, targets: list[tuple[str, int]], progress: Progress | None) -> None:
    """Decrypt entries segment by segment (bounded memory) and append them to their target fds."""
    for name, fd in targets:
        for chunk in art.iter_chunks(name):
            os.write(fd, chunk)
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
    """The owner's explicit decrypt: write plaintext files. Nothing is left behind if any check fails."""
    src, out = Path(path), Path(output)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    written: list[Path] = []
    root, names = sealed_files(src)
    ident = resolve_identity(identity)
    cache: dict[bytes, bytearray] = {}
    try:
        arts = {n: open_artifact(root / n, ident, dek_cache=cache) for n in names}
        try:
            if src.is_dir():
                directory.check_group(root, arts)
            for n, art in arts.items():
                target = out / n if src.is_dir() else out
                written.extend(_open_one(art, target, progress))
        finally:
            for a in arts.values():
                a.close()
    except BaseException:
        for w in written:
            w.unlink(missing_ok=True)
        raise
    finally:
        directory.wipe_cache(cache)
    return [str(w) for w in written]


def _open_one(art: Artifact, target: Path, progress: Progress | None) -> list[Path]:
    if isinstance(art, sst.SealedSafetensors):
        return [_write_file(target, 0o600, lambda fd: _write_plain_safetensors(art, fd, progress))]
    assert isinstance(art, bundle.SealedBundle)
    if art.index.get("root") == "file":
        e = art.entries[0]
        return [
            _write_file(target, e.info.get("mode", 0o600), lambda fd: _stream_entries(art, [(e.name, fd)], progress))
        ]
    out = []
    for d in art.index.get("dirs", []):
        (target / d).mkdir(parents=True, exist_ok=True)
    for e in art.entries:
        dest = target / e.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        out.append(
            _write_file(dest, e.info.get("mode", 0o600), lambda fd, e=e: _stream_entries(art, [(e.name, fd)], progress))
        )
    return out


def _write_file(path: Path, mode: int, fill: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fill(fd)
        os.fchmod(fd, mode & 0o777)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return path


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
    """Add or remove recipients by rewriting headers only; the ciphertext is not touched."""
    adds = [parse_recipient(r) if isinstance(r, str) else r for r in add]
    removes = [parse_recipient(r) if isinstance(r, str) else r for r in remove]
    if not adds and not removes:
        raise UsageError("nothing to do: give --add-recipient and/or --remove-recipient")
    root, names = sealed_files(path)
    ident = resolve_identity(identity)
    cache: dict[bytes, bytearray] = {}
    reports = []
    try:
        for n in names:
            with open_artifact(root / n, ident, dek_cache=cache) as art:
                env = art.envelope
                kept = [s for s in env.recipients if not any(_matches(r, s) for r in removes)]
                removed = len(env.recipients) - len(kept)
                if removes and not removed:
                    raise UsageError(f"{art.path}: no stanza matches the recipient(s) to remove")
                kept += [r.wrap(bytes(art.dek), dek_context(env.artifact_id)) for r in adds]
                if not kept:
                    raise UsageError(f"{art.path}: refusing to remove every recipient (nobody could open it)")
                env.recipients = kept
                in_place = _rewrite_header(art)
                reports.append(
                    {
                        "file": art.path,
                        "added": len(adds),
                        "removed": removed,
                        "recipients": len(kept),
                        "rewritten": "header only" if in_place else "header moved",
                    }
                )
    finally:
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
        with open(art.path, "r+b") as f:
            f.write(head)
            os.fsync(f.fileno())
        return True
    head = _new_header(art, None)
    path = Path(art.path)
    tmp = path.with_name(f".{path.name}.rekey-{os.getpid()}")
    end = art.payload_offset + art.payload_size + art.tag_count * TAG_SIZE
    try:
        with open(art.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(head)
            src.seek(art.payload_offset)
            remaining = end - art.payload_offset
            while remaining:
                chunk = src.read(min(remaining, 16 << 20))
                dst.write(chunk)
                remaining -= len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return False
