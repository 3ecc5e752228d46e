"""Sealed artifacts read straight from object storage and HTTP(S): ``s3://bucket/key``, ``https://...``,
``http://...`` (see docs/remote.md).

The format reads an artifact through a :class:`~modelseal.format.container.ByteSource`; this package
provides the remote one (:class:`~.source.RemoteSource`): the header and tag region are read first and held
in memory, and the payload is fetched with segment-aligned range requests in parallel, each written into
the buffer it is decrypted in and authenticated there. Nothing is written to disk.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("s3://", "https://", "http://")


def is_remote(location: object) -> bool:
    """Whether ``location`` is a URL this package reads (a ``str``: ``Path`` would fold ``//``)."""
    return isinstance(location, str) and location.lower().startswith(SCHEMES)


def display(url: str) -> str:
    """``url`` without credentials, query or fragment: what messages and logs may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
