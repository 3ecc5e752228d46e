"""``s3://bucket/key`` through boto3: credentials, region and endpoint from the usual AWS places.

boto3 is used for what it is good at: finding credentials (environment, profiles, SSO, instance and
container roles), the bucket's region and endpoint (``AWS_ENDPOINT_URL_S3`` for S3-compatible stores),
``HeadObject`` errors with their AWS codes, listing a prefix, and SigV4 signing. The bytes are then
fetched with presigned ``GET`` URLs through the same range reader as ``https://`` (``http.py``).

Why not ``get_object(Range=...)`` per range: each call pays boto3's request machinery in Python (event
hooks, signing, response parsing: about a millisecond of CPU per call here, measured in bench/remote.py's
notes), and its body is a stream read into new ``bytes`` anyway. A presigned URL is signed once per object
(and again after half its lifetime), so a 100 GB load costs no more signing than a 1 MB one, and ranges,
retries and the checks of every answer are one code path for S3 and HTTP.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import unquote

from modelseal.errors import MissingDependencyError, UsageError

URL_LIFETIME = 3600  # seconds a presigned URL is valid; a fresh one is made after half of it
_clients: dict[str | None, Any] = {}
_lock = threading.Lock()


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty or end in ``/`` (a prefix)."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"{url}: an S3 URL is s3://BUCKET/KEY")
    return bucket, unquote(key)


def _boto3() -> Any:
    try:
        import boto3
        import botocore.config
    except ImportError:
        raise MissingDependencyError("reading s3:// needs boto3: pip install 'modelseal[remote]'") from None
    return boto3, botocore.config


def client(region: str | None = None) -> Any:
    """A thread-safe S3 client (one per region), from boto3's default credential chain."""
    with _lock:
        found = _clients.get(region)
        if found is None:
            boto3, config = _boto3()
            found = _clients[region] = boto3.session.Session().client(
                "s3",
                region_name=region,
                config=config.Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
            )
        return found


def explain(url: str, exc: Exception) -> UsageError:
    """One line for a boto3 failure: what AWS said (code), never a traceback or a credential."""
    import botocore.exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        return UsageError(f"{url}: no AWS credentials found ({hint})")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return UsageError(f"{url} does not exist ({code})")
        if code in ("403", "AccessDenied", "Forbidden"):
            return UsageError(f"{url}: access denied by S3 ({code}): check the AWS credentials and the bucket policy")
        return UsageError(f"{url}: S3 refused the request ({code}, HTTP {status})")
    if isinstance(exc, bx.BotoCoreError):
        return UsageError(f"{url}: cannot reach S3: {exc}")
    raise exc


class S3Object:
    """One object: its size and a presigned GET URL kept fresh, in the bucket's own region."""

    def __init__(self, url: str) -> None:
        _boto3()
        import botocore.exceptions as bx

        self.url = url
        self.bucket, self.key = split(url)
        if not self.key or self.key.endswith("/"):
            raise UsageError(f"{url} names a prefix, not an object")
        try:
            head = client().head_object(Bucket=self.bucket, Key=self.key)
        except (bx.ClientError, bx.BotoCoreError) as exc:
            raise explain(url, exc) from None
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        self._client = client(region) if region and region != client().meta.region_name else client()
        self.size = int(head["ContentLength"])
        self._signed = ("", 0.0)
        self._sign_lock = threading.Lock()

    def presigned(self) -> str:
        """A GET URL valid for at least half of :data:`URL_LIFETIME` (signed locally, no request)."""
        with self._sign_lock:
            url, at = self._signed
            if not url or time.monotonic() - at > URL_LIFETIME / 2:
                url = self._client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self.key}, ExpiresIn=URL_LIFETIME
                )
                self._signed = (url, time.monotonic())
            return url


def list_prefix(url: str) -> list[str]:
    """Keys under ``s3://bucket/prefix/``, relative to the prefix, sorted (a sealed directory's files)."""
    _boto3()
    import botocore.exceptions as bx

    bucket, prefix = split(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    names: list[str] = []
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
    except (bx.ClientError, bx.BotoCoreError) as exc:
        raise explain(url, exc) from None
    return sorted(n for n in names if n and not n.endswith("/"))
