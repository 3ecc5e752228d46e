"""Range GETs over HTTP(S): checked, retried, read straight into the caller's buffers.

Every response must be exactly the range asked for: ``206 Partial Content`` whose ``Content-Range`` names
the same first and last byte and the same object size as every earlier response, a ``Content-Length``
(when sent) of that many bytes, no content coding, and a body of exactly that length. Anything else (a
``200`` with the whole object, another range, a short or long body) is a :class:`FormatError` naming the
URL, so a misbehaving server or proxy is an error, never bytes at the wrong place. (The bytes themselves
are authenticated anyway, segment by segment, when they are decrypted.)

Transient failures (a connection refused or reset, a timeout, a body cut off, 408, 429 and 5xx answers)
are retried with bounded exponential backoff; a retry resumes at the first byte not yet received. The
connections, proxies and the per-request deadline are ``connections.py``'s.
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn
from urllib.parse import quote, urlsplit

from modelseal.errors import FormatError, UsageError
from modelseal.load.remote.config import CA_BUNDLE_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV, TOKEN_ENV, RemoteSettings
from modelseal.load.remote.connections import (
    DeadlinePassedError,
    Exchange,
    Origin,
    Pool,
    ProxyRefusedError,
    basic_authorization,
    deadlines,
)
from modelseal.version import __version__

_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")  # int() of 5,000 digits raises
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_BACKOFF_CAP = 2.0  # seconds; the first retry waits about 0.1 s
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")  # after IDNA: letters, digits, hyphens (and _)
_URL_SAFE = "/%!$&'()*+,;=:@-._~?"  # what a request target may hold as it is; anything else is %-escaped
MIN_RATE = 256 << 10  # bytes/s: a range arriving slower than this (after the timeout's allowance) is retried
_PROXY_HINT = "give them in the proxy's URL ($HTTPS_PROXY or $HTTP_PROXY: http://user:password@host:port)"
UrlFor = Callable[[], str]
"""The URL to request now (an S3 source presigns again when its URL gets old)."""


class _TransientError(Exception):
    """A failure worth retrying (its message says what happened)."""


class _StaleConnectionError(Exception):
    """A kept-alive connection the server had closed just before the request went out: try a new one."""


def _ssl_context(s: RemoteSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=s.ca_bundle)
        if s.client_cert:
            ctx.load_cert_chain(s.client_cert, s.client_key)
    except (OSError, ssl.SSLError) as exc:
        names = f"${CA_BUNDLE_ENV} or ${CLIENT_CERT_ENV}"
        raise UsageError(f"cannot load the TLS files named by {names}: {exc}") from None
    return ctx


def _tls_refusal(exc: BaseException, name: str, has_cert: bool, handshake: bool) -> UsageError | None:
    """One line for a failed TLS handshake, saying which side refused and what to set; None if it was not
    one. The ``ssl`` error is looked for in the exception's chain as well. After the ``handshake`` only a
    certificate refusal counts (TLS 1.3 checks the client's certificate then); any other TLS failure later
    (a damaged record) is worth a retry."""
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
    if not handshake:
        return None
    if "UNEXPECTED_EOF" in upper:  # the server hung up inside the handshake, without saying why
        hint = "does it trust this client certificate?" if has_cert else \
            f"if it requires a client certificate (mTLS), set ${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV}"  # fmt: skip
        return UsageError(f"cannot read {name}: the server closed the connection during the TLS handshake ({hint})")
    if tls is not None or "[SSL" in upper:
        return UsageError(f"cannot read {name}: TLS failed ({text.strip()[:160]})")
    return None


_pools: dict[RemoteSettings, Pool] = {}
_pools_lock = threading.Lock()


def pool(s: RemoteSettings) -> Pool:
    """The process's connection pool for these settings (kept connections serve every later load)."""
    with _pools_lock:
        found = _pools.get(s)
        if found is None:
            found = _pools[s] = Pool(lambda: _ssl_context(s), s.timeout, keep=s.concurrency + 4)
        return found


def _origin(parts: object) -> str:
    """``host`` or ``host:port`` of a split URL, lower-case: what ``$MODELSEAL_HTTP_TOKEN_HOSTS`` lists."""
    host = (getattr(parts, "hostname", None) or "").lower()
    port = getattr(parts, "port", None)
    return f"{host}:{port}" if port else host


def _ascii_host(host: str, name: str) -> str:
    """The host as it may appear in a request (IDNA for a non-ASCII name); anything else is refused, so no
    URL can put spaces or control characters into a request or ``CONNECT`` line."""
    if ":" in host:  # an IPv6 literal (urlsplit took its brackets off)
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise UsageError(f"cannot read {name}: the URL's IPv6 address is not valid") from None
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_host = ""
    if not _HOST.fullmatch(ascii_host):
        raise UsageError(f"cannot read {name}: the URL's host name is not valid")
    return ascii_host


def _where(url: str, name: str) -> tuple[Origin, str]:
    """The origin and request target (path and query, escaped where they must be) of a URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError(f"cannot read {name}: not a valid URL (its port or address)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"cannot read {name}: not an http:// or https:// URL with a host")
    query = f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else ""
    target = quote(parts.path or "/", safe=_URL_SAFE) + query
    return Origin(scheme, _ascii_host(parts.hostname, name), port or (443 if scheme == "https" else 80)), target


class _Cursor:
    """Where the next received byte goes: consecutive buffers filled in order, ``done(i)`` called as
    buffer ``i`` completes. A retry resumes at :attr:`offset`."""

    def __init__(self, outs: Sequence[memoryview], done: Callable[[int], None] | None = None) -> None:
        self.outs, self._done = outs, done
        self.index = self.filled = self.offset = 0
        self._next()

    def space(self) -> memoryview:
        return self.outs[self.index][self.filled :]

    def advance(self, n: int) -> None:
        self.filled += n
        self.offset += n
        self._next()

    def _next(self) -> None:
        while self.index < len(self.outs) and self.filled == len(self.outs[self.index]):
            if self._done is not None:
                self._done(self.index)
            self.index, self.filled = self.index + 1, 0


class RangeReader:
    """Ranged reads of one object at ``url()``; its size is learnt from the first answer and held to."""

    def __init__(self, url: UrlFor, name: str, s: RemoteSettings, headers: dict[str, str] | None = None) -> None:
        self._url = url
        self.name = name
        self._settings = s
        self._pool = pool(s)
        self._headers = {"Accept-Encoding": "identity", "User-Agent": f"modelseal/{__version__}", **(headers or {})}
        first = url()
        _where(first, name)  # a malformed URL is one clear line here, before anything else reads it
        target = urlsplit(first)
        self._https = target.scheme.lower() == "https"
        basic = basic_authorization(target)
        if s.token and self._https and _origin(target) in s.token_hosts:
            self._headers["Authorization"] = f"Bearer {s.token}"
        elif basic is not None:
            self._headers["Authorization"] = basic
        self.size: int | None = None

    # -- one request
    def _get(self, first: int, last: int, into: _Cursor, clamp: bool) -> None:
        """GET bytes ``first..last`` (inclusive) into ``into``.

        With ``clamp`` the server may end the range early at the end of the object (the first read,
        before the size is known); otherwise it must be exactly the range asked for.
        """
        origin, target = _where(self._url(), self.name)
        # the whole request is bounded: a server trickling a byte a second would never hit a read timeout
        deadline = time.monotonic() + self._settings.timeout + (last - first + 1) / MIN_RATE
        stage = ["connect"]  # how far the request got: connect, answer (fresh or reused connection), body
        try:
            try:
                self._exchange(self._pool.open(origin, target, deadline), first, last, into, clamp, stage)
            except _StaleConnectionError:
                stage[0] = "connect"
                self._exchange(self._pool.open(origin, target, deadline, fresh=True), first, last, into, clamp,
                               stage)  # fmt: skip
        except DeadlinePassedError:
            raise _TransientError(f"the server sent bytes {first}-{last} slower than {MIN_RATE >> 10} KiB/s (after "
                                  "the timeout's allowance)") from None  # fmt: skip
        except ProxyRefusedError as exc:
            if exc.status == 407:
                raise UsageError(f"cannot read {self.name}: the proxy wants credentials (HTTP 407): {_PROXY_HINT}") \
                    from None  # fmt: skip
            if exc.status in _RETRY_STATUS:
                raise _TransientError(str(exc)) from None
            raise UsageError(f"cannot read {self.name}: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            self._failed(exc, stage[0])
        except ValueError as exc:  # a header http.client refuses to send (non-Latin-1 characters in a token)
            raise UsageError(f"cannot read {self.name}: {type(exc).__name__}") from None

    def _failed(self, exc: OSError | http.client.HTTPException, stage: str) -> NoReturn:
        refused = _tls_refusal(exc, self.name, bool(self._settings.client_cert), handshake=stage == "connect")
        if refused is not None:  # a TLS refusal is not transient: retrying cannot change the certificates
            raise refused from None
        text = "" if isinstance(exc, http.client.InvalidURL) else ascii(str(exc)[:200])[1:-1]
        what = type(exc).__name__ + (f" ({text})" if text else "")
        hung_up = isinstance(exc, (ConnectionError, ssl.SSLEOFError))
        if hung_up and stage == "answer-fresh" and self._https and not self._settings.client_cert:
            # TLS 1.3: a server that wants a client certificate checks it after the handshake and hangs up
            what += (f"; if the server requires a client certificate (mTLS), set ${CLIENT_CERT_ENV} and "
                     f"${CLIENT_KEY_ENV}")  # fmt: skip
        raise _TransientError(what) from None

    def _exchange(self, ex: Exchange, first: int, last: int, into: _Cursor, clamp: bool, stage: list[str]) -> None:
        """One request and its answer on ``ex``'s connection, which goes back to the pool only if the answer
        was read to its end and the deadline did not cut it."""
        try:
            stage[0] = "answer-reused" if ex.reused else "answer-fresh"
            headers = {**self._headers, **ex.proxy_headers, "Host": ex.route[0].authority(),
                       "Range": f"bytes={first}-{last}"}  # fmt: skip
            try:
                ex.conn.request("GET", ex.target, headers=headers)
                r = ex.conn.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                if not ex.reused:
                    raise
                raise _StaleConnectionError from None
            stage[0] = "body"
            got = self._check(r, first, last, clamp)
            want, n = got[1] - got[0] + 1, 0
            while n < want:
                k = r.readinto(into.space()[: want - n])
                if not k:
                    raise _TransientError(f"the answer for bytes {got[0]}-{got[1]} was cut off after {n} of "
                                          f"{want} bytes")  # fmt: skip
                into.advance(k)
                n += k
            # nothing may follow: a chunked or read-to-close body must end here (a Content-Length body has;
            # anything sent past it is dropped with the answer's buffer). readinto, never read(n): a chunk
            # size the server chose must not become an allocation
            if r.readinto(bytearray(1)):
                raise FormatError(f"{self.name}: the server sent more bytes than the range it announced")
        except BaseException as exc:
            cut = deadlines.clear(ex.watch)
            ex.conn.close()
            if cut and isinstance(exc, Exception):
                raise DeadlinePassedError from None
            raise
        cut = deadlines.clear(ex.watch)
        self._pool.release(ex, reusable=not cut)

    def _check(self, r: http.client.HTTPResponse, first: int, last: int, clamp: bool) -> tuple[int, int]:
        status = r.status
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
        if status == 407:
            raise UsageError(f"{self.name}: the proxy wants credentials (HTTP 407): {_PROXY_HINT}")
        if 300 <= status < 400:
            raise UsageError(f"{self.name}: the server redirects (HTTP {status}); modelseal does not follow "
                             "redirects (one could lead to http:// or an internal address): give the final URL")
        if status == 416:
            raise FormatError(f"{self.name}: bytes {first}-{last} are past the end of the object (truncated?)")
        if status != 206:
            raise UsageError(f"{self.name}: unexpected answer HTTP {status}")
        coding = r.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise FormatError(f"{self.name}: the server sent the range with Content-Encoding {coding[:40]!r} "
                              "(encoded); it must send it as stored")  # fmt: skip
        framing = [v.strip().lower() for v in r.headers.get_all("transfer-encoding") or []]
        if framing not in ([], ["chunked"]):  # http.client would read "gzip, chunked" as a raw body
            raise FormatError(f"{self.name}: the server sent the range with Transfer-Encoding "
                              f"{', '.join(framing)[:40]!r}; only chunked framing is read")  # fmt: skip
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
        lengths = {v.strip() for v in r.headers.get_all("content-length") or []}
        length = lengths.pop() if len(lengths) == 1 else None if not lengths else "(several)"
        if length is not None and length != str(b - a + 1):
            raise FormatError(f"{self.name}: Content-Length {length[:20]!a} does not match its range {a}-{b}")
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
        into = _Cursor([memoryview(bytearray(length))])

        def attempt() -> None:
            end = length if self.size is None else min(length, self.size)
            if into.offset < end:
                self._get(into.offset, end - 1, into, clamp=self.size is None)

        self._retrying(attempt)
        return bytes(into.outs[0][: into.offset])

    def read_parts(self, offset: int, outs: Sequence[memoryview], done: Callable[[int], None] | None = None) -> None:
        """Fill ``outs`` (consecutive bytes from ``offset``) with one range request, calling ``done(i)``
        as each buffer completes; a retry resumes where the failed answer stopped."""
        into = _Cursor(outs, done)
        end = offset + sum(len(o) for o in outs)

        def attempt() -> None:
            if offset + into.offset < end:
                self._get(offset + into.offset, end - 1, into, clamp=False)

        self._retrying(attempt)
