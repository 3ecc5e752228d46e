"""Sealed directories under a URL prefix: which members to open, and where each one lies.

* ``s3://bucket/prefix/``: the prefix is listed (``ListObjectsV2``); the listing is what is present, so
  a missing or extra member is found as for a local directory.
* ``https://host/path/`` (and ``http://``): HTTP cannot list, so the member list is read from the
  protected header of one member, ``config.json`` by default (every Hugging Face model directory has
  one) or the member named after ``#``: ``https://host/model/#weights.safetensors``. Every member's
  header carries the same list, authenticated once the directory is unlocked; a listed member the
  server does not have is an error when it is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from modelseal.errors import UsageError
from modelseal.format.directory import MARKER_KEY
from modelseal.format.schema import relpath
from modelseal.load.remote import display, s3

DEFAULT_SEED = "config.json"


def is_remote_dir(url: str) -> bool:
    """A URL names a sealed directory when its path ends with ``/`` (before any ``#member``)."""
    return url.partition("#")[0].endswith("/")


@dataclass(frozen=True)
class RemoteTree:
    """A sealed directory at ``base`` (ending in ``/``): members to open and, for S3, what is present."""

    base: str
    members: list[str]
    present: set[str]

    def locate(self, rel: str) -> str:
        return self.base + (rel if self.base.startswith("s3://") else quote(rel))


def open_tree(url: str) -> RemoteTree:
    base, _, seed = url.partition("#")
    shown = display(base)
    if not base.endswith("/"):
        raise UsageError(f"{display(url)} is not a directory URL (it must end with /)")
    if base.lower().startswith("s3://"):
        names = s3.list_prefix(base)
        if not names:
            raise UsageError(f"{shown} holds no files")
        return RemoteTree(base, names, set(names))
    from modelseal.load.artifacts import open_locked  # artifacts dispatches URLs to this package

    seed = seed or DEFAULT_SEED
    relpath(seed, f"{shown}: the member after #")
    try:
        with open_locked(base + quote(seed)) as art:
            group = art.envelope.protected.get(MARKER_KEY)
            members = group.get("members") if isinstance(group, dict) else None
    except UsageError as exc:
        raise UsageError(
            f"{exc} (HTTP cannot list {shown}: its member list is read from {seed}; name another member "
            "after #, as in .../model/#model.safetensors)"
        ) from None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise UsageError(f"{shown}{seed} was not sealed as part of a directory: name the file, not {shown}")
    for m in members:
        relpath(m, f"{shown}{seed}: a member name")
    return RemoteTree(base, list(members), set(members))
