"""Range GETs over HTTP(S) with httpx: checked, retried, written straight into the caller's buffers.

Every response must be exactly the range asked for: ``206 Partial Content`` whose ``Content-Range`` names
the same first and last byte and the same object size as every earlier response, a ``Content-Length``
(when sent) of that many bytes, no content coding, and a body of exactly that length. Anything else (a
``200`` with the whole object, another range, a short or long body) is a :class:`FormatError` naming the
URL, so a misbehaving server or proxy is an error, never bytes at the wrong place. (The bytes themselves
are authenticated anyway, segment by segment, when they are decrypted.)

Transient failures (a connection refused or reset, a timeout, a body cut off, 408, 429 and 5xx answers)
are retried with bounded exponential backoff; a retry resumes at the first byte not yet received.
"""

from __future__ import annotations

import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx

from modelseal.errors import FormatError, UsageError
from modelseal.load.remote.config import CA_BUNDLE_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV, TOKEN_ENV, RemoteSettings

_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")  # int() of 5,000 digits raises
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_BACKOFF_CAP = 2.0  # seconds; the first retry waits about 0.1 s
MIN_RATE = 256 << 10  # bytes/s: a range arriving slower than this (after the timeout's allowance) is retried
UrlFor = Callable[[], str]
"""The URL to request now (an S3 source presigns again when its URL gets old)."""


class _TransientError(Exception):
    """A failure worth retrying (its message says what happened)."""


def _ssl_context(s: RemoteSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=s.ca_bundle)
        if s.client_cert:
            ctx.load_cert_chain(s.client_cert, s.client_key)
    except (OSError, ssl.SSLError) as exc:
        names = f"${CA_BUNDLE_ENV} or ${CLIENT_CERT_ENV}"
        raise UsageError(f"cannot load the TLS files named by {names}: {exc}") from None
    return ctx


def _tls_refusal(exc: BaseException, name: str, has_cert: bool) -> UsageError | None:
    """One line for a failed TLS handshake, saying which side refused and what to set; None if it was not
    one. The ``ssl`` error is found in the exception's chain (httpx wraps httpcore's, which wraps it)."""
    seen: BaseException | None = exc
    tls: ssl.SSLError | None = None
    while seen is not None and tls is None:
        tls = seen if isinstance(seen, ssl.SSLError) else None
        seen = seen.__cause__ or seen.__context__
    text = f"{tls.reason or ''} {tls}" if tls is not None else str(exc)
    upper = text.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        if "HOSTNAME" in upper or "IP ADDRESS MISMATCH" in upper:
            return UsageError(f"cannot read {name}: the server's TLS certificate does not name this host")
        return UsageError(f"cannot read {name}: the server's TLS certificate is not trusted (set ${CA_BUNDLE_ENV} "
                          "to the CA that signs it)")  # fmt: skip
    if "CERTIFICATE_REQUIRED" in upper or "HANDSHAKE_FAILURE" in upper or "UNKNOWN_CA" in upper \
            or "BAD_CERTIFICATE" in upper or "CERTIFICATE_UNKNOWN" in upper:  # fmt: skip
        return UsageError(f"cannot read {name}: the server refused the TLS handshake (it wants a client certificate "
                          f"it trusts: set ${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV})")  # fmt: skip
    if "UNEXPECTED_EOF" in upper:  # the server hung up inside the handshake, without saying why
        hint = "does it trust this client certificate?" if has_cert else \
            f"if it requires a client certificate (mTLS), set ${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV}"  # fmt: skip
        return UsageError(f"cannot read {name}: the server closed the connection during the TLS handshake ({hint})")
    if tls is not None or "[SSL" in upper:
        return UsageError(f"cannot read {name}: TLS failed ({text.strip()[:160]})")
    return None


_clients: dict[RemoteSettings, httpx.Client] = {}
_clients_lock = threading.Lock()


def client(s: RemoteSettings) -> httpx.Client:
    """The process's pooled client for these settings (kept connections serve every later load)."""
    with _clients_lock:
        found = _clients.get(s)
        if found is None:
            found = _clients[s] = httpx.Client(
                verify=_ssl_context(s),
                timeout=httpx.Timeout(s.timeout),
                limits=httpx.Limits(max_connections=s.concurrency + 4, max_keepalive_connections=s.concurrency + 4),
                follow_redirects=False,  # a redirect is refused: it could downgrade to http:// or reach inside
                trust_env=True,  # HTTPS_PROXY / NO_PROXY as usual
            )
        return found


def _origin(parts: object) -> str:
    """``host`` or ``host:port`` of a split URL, lower-case: what ``$MODELSEAL_HTTP_TOKEN_HOSTS`` lists."""
    host = (getattr(parts, "hostname", None) or "").lower()
    port = getattr(parts, "port", None)
    return f"{host}:{port}" if port else host


class RangeReader:
    """Ranged reads of one object at ``url()``; its size is learnt from the first answer and held to."""

    def __init__(self, url: UrlFor, name: str, s: RemoteSettings, headers: dict[str, str] | None = None) -> None:
        self._url = url
        self.name = name
        self._settings = s
        self._client = client(s)
        self._headers = {"Accept-Encoding": "identity", **(headers or {})}
        target = urlsplit(url())
        self._https = target.scheme.lower() == "https"
        if s.token and target.scheme.lower() == "https" and _origin(target) in s.token_hosts:
            self._headers["Authorization"] = f"Bearer {s.token}"
        self.size: int | None = None

    # -- one request
    def _get(self, first: int, last: int, sink: Callable[[memoryview], None], clamp: bool) -> tuple[int, int]:
        """GET bytes ``first..last`` (inclusive) and feed the body to ``sink``; (first, last) received.

        With ``clamp`` the server may end the range early at the end of the object (the first read,
        before the size is known); otherwise it must be exactly the range asked for.
        """
        started = time.monotonic()
        try:
            with self._client.stream(
                "GET", self._url(), headers={**self._headers, "Range": f"bytes={first}-{last}"}
            ) as r:
                got = self._check(r, first, last, clamp)
                want = got[1] - got[0] + 1
                # the timeout is between bytes: a server trickling a byte a second would never time out
                deadline = started + self._settings.timeout + want / MIN_RATE
                n = 0
                for chunk in r.iter_raw():
                    n += len(chunk)
                    if n > want:
                        raise FormatError(f"{self.name}: the server sent more bytes than the range it announced")
                    sink(memoryview(chunk))
                    if time.monotonic() > deadline:
                        raise _TransientError(f"the server sent bytes {got[0]}-{got[1]} slower than "
                                              f"{MIN_RATE >> 10} KiB/s")  # fmt: skip
                if n < want:
                    raise FormatError(
                        f"{self.name}: the server's answer for bytes {got[0]}-{got[1]} ended after {n} of {want} bytes"
                    )
                return got
        except httpx.TransportError as exc:
            refused = _tls_refusal(exc, self.name, bool(self._settings.client_cert))
            if refused is not None:  # a TLS refusal is not transient: retrying cannot change the certificates
                raise refused from None
            what = type(exc).__name__ + (f" ({exc})" if str(exc) else "")
            if isinstance(exc, httpx.RemoteProtocolError) and self._https and not self._settings.client_cert:
                # TLS 1.3: a server that wants a client certificate checks it after the handshake and hangs up
                what += (f"; if the server requires a client certificate (mTLS), set ${CLIENT_CERT_ENV} and "
                         f"${CLIENT_KEY_ENV}")  # fmt: skip
            raise _TransientError(what) from None
        except httpx.HTTPError as exc:  # not a transport failure (a malformed URL or answer): one line
            raise UsageError(f"cannot read {self.name}: {type(exc).__name__}") from None

    def _check(self, r: httpx.Response, first: int, last: int, clamp: bool) -> tuple[int, int]:
        status = r.status_code
        if status in _RETRY_STATUS:
            raise _TransientError(f"HTTP {status}")
        if status == 200:
            raise FormatError(
                f"{self.name}: the server answered a range request with the whole object (HTTP 200): "
                "modelseal reads sealed objects by ranges only; use a server or proxy that supports Range"
            )
        if status == 404:
            raise UsageError(f"{self.name} does not exist (HTTP 404)")
        if status in (401, 403):
            hint = "check the AWS credentials" if self.name.startswith("s3://") else f"set ${TOKEN_ENV} or mTLS"
            raise UsageError(f"{self.name}: access denied (HTTP {status}): {hint}")
        if 300 <= status < 400:
            raise UsageError(f"{self.name}: the server redirects (HTTP {status}); modelseal does not follow "
                             "redirects (one could lead to http:// or an internal address): give the final URL")
        if status == 416:
            raise FormatError(f"{self.name}: bytes {first}-{last} are past the end of the object (truncated?)")
        if status != 206:
            raise UsageError(f"{self.name}: unexpected answer HTTP {status}")
        coding = r.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise FormatError(f"{self.name}: the server sent the range {coding}-encoded; it must send it as stored")
        m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", "").strip())
        if m is None:
            raise FormatError(f"{self.name}: a 206 answer without a valid Content-Range")
        a, b, total = (int(g) for g in m.groups())
        if self.size is not None and total != self.size:
            raise FormatError(f"{self.name} changed size while it was being read ({self.size} -> {total} bytes)")
        expected_last = min(last, total - 1) if clamp else last
        if a != first or b != expected_last or b >= total:
            raise FormatError(
                f"{self.name}: asked for bytes {first}-{last}, the server sent {a}-{b} of {total} (wrong range)"
            )
        length = r.headers.get("content-length")
        if length is not None and length.strip() != str(b - a + 1):
            raise FormatError(f"{self.name}: Content-Length {length.strip()[:20]} does not match its range {a}-{b}")
        self.size = total
        return a, b

    def _retrying(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` until it succeeds, retrying transient failures with bounded backoff."""
        for n in range(self._settings.retries + 1):
            try:
                attempt()
                return
            except _TransientError as exc:
                if n == self._settings.retries:
                    raise UsageError(
                        f"cannot read {self.name}: {exc} (after {self._settings.retries} retries)"
                    ) from None
                time.sleep(min(_BACKOFF_CAP, 0.1 * 2**n) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter

    # -- reads
    def head(self, length: int) -> bytes:
        """The first ``length`` bytes, or the whole object if shorter; sets :attr:`size`."""
        buf = bytearray()

        def attempt() -> None:
            buf.clear()
            self._get(0, length - 1, buf.extend, clamp=True)

        self._retrying(attempt)
        return bytes(buf)

    def read_parts(self, offset: int, outs: Sequence[memoryview], done: Callable[[int], None] | None = None) -> None:
        """Fill ``outs`` (consecutive bytes from ``offset``) with one range request, calling ``done(i)``
        as each buffer completes; a retry resumes where the failed answer stopped."""
        state = [0, 0]  # buffer index, bytes filled in it

        def advance() -> None:
            while state[0] < len(outs) and state[1] == len(outs[state[0]]):
                if done is not None:
                    done(state[0])
                state[0], state[1] = state[0] + 1, 0

        def sink(chunk: memoryview) -> None:
            while chunk:
                i, filled = state
                out = outs[i]
                n = min(len(chunk), len(out) - filled)
                out[filled : filled + n] = chunk[:n]
                state[1] = filled + n
                chunk = chunk[n:]
                advance()

        end = offset + sum(len(o) for o in outs)

        def attempt() -> None:
            advance()
            pos = end - sum(len(o) for o in outs[state[0] :]) + state[1]
            if pos < end:
                self._get(pos, end - 1, sink, clamp=False)
            advance()

        self._retrying(attempt)
