"""Settings of remote reads, from the environment (read once per opened artifact).

============================== ========= =====================================================
variable                        default   meaning
============================== ========= =====================================================
MODELSEAL_REMOTE_CONCURRENCY    16        range requests in flight per artifact
MODELSEAL_REMOTE_PART_SIZE      16 MiB    bytes per range request (whole segments; at least one)
MODELSEAL_REMOTE_RETRIES        4         retries of a range after a transient failure
MODELSEAL_REMOTE_TIMEOUT        60        seconds without progress before a request fails
MODELSEAL_HTTP_BEARER_TOKEN     (none)    ``Authorization: Bearer`` for https:// (never sent over http://)
MODELSEAL_HTTP_TOKEN_FILE       (none)    the same, read from a file (one line)
MODELSEAL_HTTP_TOKEN_HOSTS      (none)    hosts (``host`` or ``host:port``, comma-separated) the token is
                                          sent to; required with a token (a URL in a model repository
                                          could name any host), never S3 (its URLs are presigned)
MODELSEAL_HTTP_CLIENT_CERT      (none)    PEM client certificate for mTLS (with ..._CLIENT_KEY)
MODELSEAL_HTTP_CLIENT_KEY       (none)    its PEM private key (unencrypted)
MODELSEAL_HTTP_CA_BUNDLE        (system)  PEM file of CAs to trust instead of the system's
============================== ========= =====================================================

Sealing *to* ``s3://`` (``modelseal.sealing.remote``) reads two of them: ``MODELSEAL_REMOTE_PART_SIZE`` is the
size of an uploaded part (at least 5 MiB, S3's minimum, and large enough for at most 10,000 parts), and
``MODELSEAL_REMOTE_CONCURRENCY`` the number of parts uploading or queued at once (default 4 for uploads:
each is a part-sized buffer of ciphertext in memory).

S3 credentials, region and endpoint come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``,
``~/.aws/config``, instance roles, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from modelseal.errors import UsageError

CONCURRENCY_ENV = "MODELSEAL_REMOTE_CONCURRENCY"
PART_SIZE_ENV = "MODELSEAL_REMOTE_PART_SIZE"
RETRIES_ENV = "MODELSEAL_REMOTE_RETRIES"
TIMEOUT_ENV = "MODELSEAL_REMOTE_TIMEOUT"
TOKEN_ENV = "MODELSEAL_HTTP_BEARER_TOKEN"  # noqa: S105 - a variable name
TOKEN_FILE_ENV = "MODELSEAL_HTTP_TOKEN_FILE"  # noqa: S105 - a variable name
CLIENT_CERT_ENV = "MODELSEAL_HTTP_CLIENT_CERT"
CLIENT_KEY_ENV = "MODELSEAL_HTTP_CLIENT_KEY"
CA_BUNDLE_ENV = "MODELSEAL_HTTP_CA_BUNDLE"
TOKEN_HOSTS_ENV = "MODELSEAL_HTTP_TOKEN_HOSTS"  # noqa: S105 - a variable name


@dataclass(frozen=True)
class RemoteSettings:
    concurrency: int = 16
    part_size: int = 16 << 20
    retries: int = 4
    timeout: float = 60.0
    token: str | None = None
    token_hosts: tuple[str, ...] = ()
    client_cert: str | None = None
    client_key: str | None = None
    ca_bundle: str | None = None


def _int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise UsageError(f"${name} must be a whole number from {low} to {high}")
    return int(raw)


def _size(name: str, default: int) -> int:
    """A byte count with an optional K/M/G suffix (binary)."""
    raw = os.environ.get(name, "").strip().upper().removesuffix("B").removesuffix("I")
    if not raw:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1], 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit() or not 4096 <= int(digits) * scale <= 1 << 30:
        raise UsageError(f"${name} must be a size from 4K to 1G (e.g. 16M)")
    return int(digits) * scale


def _token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if path and not token:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read ${TOKEN_FILE_ENV} ({path}): {exc.strerror}") from None
    if token and any(c in token for c in "\r\n"):
        raise UsageError(f"the bearer token in ${TOKEN_ENV} or ${TOKEN_FILE_ENV} spans several lines")
    return token or None


def settings() -> RemoteSettings:
    """The settings in force now; a malformed variable is one clear error naming it (never its value)."""
    cert = os.environ.get(CLIENT_CERT_ENV) or None
    key = os.environ.get(CLIENT_KEY_ENV) or None
    if key and not cert:
        raise UsageError(f"${CLIENT_KEY_ENV} is set without ${CLIENT_CERT_ENV}")
    token = _token()
    hosts = tuple(h.strip().lower() for h in os.environ.get(TOKEN_HOSTS_ENV, "").split(",") if h.strip())
    if token and not hosts:
        raise UsageError(f"a bearer token is set (${TOKEN_ENV} or ${TOKEN_FILE_ENV}) but ${TOKEN_HOSTS_ENV} does "
                         "not say which hosts it is for (host or host:port, comma-separated)")  # fmt: skip
    return RemoteSettings(
        concurrency=_int(CONCURRENCY_ENV, 16, 1, 256),
        part_size=_size(PART_SIZE_ENV, 16 << 20),
        retries=_int(RETRIES_ENV, 4, 0, 20),
        timeout=float(_int(TIMEOUT_ENV, 60, 1, 3600)),
        token=token,
        token_hosts=hosts,
        client_cert=cert,
        client_key=key,
        ca_bundle=os.environ.get(CA_BUNDLE_ENV) or None,
    )


UPLOADS_DEFAULT = 4


@dataclass(frozen=True)
class UploadSettings:
    """Multipart uploads of sealed files: bytes per part (before S3's limits apply) and parts in flight."""

    part_size: int = 16 << 20
    uploads: int = UPLOADS_DEFAULT


def upload_settings() -> UploadSettings:
    """The upload settings in force now (the same variables as reads, with a smaller default concurrency:
    every upload in flight holds a part of ciphertext in memory)."""
    uploads = _int(CONCURRENCY_ENV, UPLOADS_DEFAULT, 1, 64)
    return UploadSettings(part_size=_size(PART_SIZE_ENV, 16 << 20), uploads=uploads)
