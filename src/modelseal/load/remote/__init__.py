"""Sealed artifacts read straight from object storage and HTTP(S): ``s3://bucket/key``, ``https://...``,
``http://...`` (see docs/remote.md).

The format reads an artifact through a :class:`~modelseal.format.container.ByteSource`; this package
provides the remote one (:class:`~.source.RemoteSource`): the header and tag region are read first and held
in memory, and the payload is fetched with segment-aligned range requests in parallel, each written into
the buffer it is decrypted in and authenticated there. Nothing is written to disk.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("s3://", "https://", "http://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_remote(location: object) -> bool:
    """Whether ``location`` is a URL this package reads (a ``str``: ``Path`` would fold ``//``)."""
    return isinstance(location, str) and location.lower().startswith(SCHEMES)


def display(url: str) -> str:
    """``url`` without credentials, query or fragment: what messages and logs may show. Never raises (a
    malformed URL shows as such), and control characters are escaped (a message stays one line)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return url.partition("://")[0][:10] + "://(a malformed URL)"
    netloc = f"{host}:{port}" if port else host
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], shown)
