"""Kept-alive HTTP/1.1 connections for range reads, on the standard library's ``http.client``.

Why not httpx (which talks to the key service): its HTTP/1.1 connection reads the socket 64 KiB at a
time and hands each piece through h11, httpcore and httpx in Python before the caller copies it out. At
loopback and data-centre speeds that, not decryption, bounded a remote load (docs/benchmarks.md,
"Remote loading"). ``http.client``'s ``readinto`` of a large buffer goes to ``recv_into`` on the socket
with the GIL released, so a range's body lands in the buffer it is decrypted in, with no copy on the way.

What httpx gave and this keeps:

- a pool of kept-alive connections per origin (scheme, host, port); an idle connection the server has
  closed, or that holds bytes nobody asked for, is dropped before it is used;
- TLS with the caller's context (the host name is checked, client certificates for mTLS);
- proxies from ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` (``http://`` proxies, with credentials in
  their URL; ``CONNECT`` tunnels for https:// targets);
- no redirects (``http.client`` follows none).

:class:`Deadlines` bounds a whole request in time. A socket timeout bounds each read only, so a server
sending a byte now and then would hold a load for hours; past its deadline a request's socket is shut down
under it by one watchdog thread, and the blocked read returns at once.
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from modelseal.errors import UsageError


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: ``https`` or ``http``, a host name or address (IPv6 without brackets), a port."""

    scheme: str
    host: str
    port: int


@dataclass
class Exchange:
    """One request's connection: the request target to send (a path, or the absolute URL for a plain-HTTP
    proxy), headers the proxy needs, and whether the connection served an earlier request."""

    conn: http.client.HTTPConnection
    target: str
    proxy_headers: dict[str, str]
    reused: bool


def _proxy_for(origin: Origin) -> tuple[str, int, dict[str, str]] | None:
    """The proxy the environment names for this origin (host, port, Proxy-Authorization), or None."""
    proxies = getproxies_environment()
    url = proxies.get(origin.scheme)
    if not url or proxy_bypass(origin.host):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise UsageError(f"${origin.scheme.upper()}_PROXY must be an http:// proxy (host and port); "
                         "modelseal does not speak TLS to a proxy")  # fmt: skip
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"${origin.scheme.upper()}_PROXY has an invalid port") from None
    headers = {}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return parts.hostname, port, headers


def _dropped(sock: socket.socket) -> bool:
    """True if an idle kept-alive socket is readable: the server closed it, or sent bytes nobody asked for
    (either way it cannot carry the next request)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Pool:
    """Idle connections per origin, for one set of TLS settings and timeouts."""

    def __init__(self, tls: Callable[[], ssl.SSLContext], timeout: float, keep: int) -> None:
        self._tls = tls  # made on first https:// use (loading a CA bundle costs milliseconds)
        self._context: ssl.SSLContext | None = None
        self._timeout = timeout
        self._keep = keep
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _context_for_tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                self._context = self._tls()
            return self._context

    def open(self, origin: Origin, path: str, fresh: bool = False) -> Exchange:
        """A connected connection to ``origin`` (an idle one unless ``fresh``) and what to send on it.
        Connecting can raise ``OSError`` (``ssl.SSLError`` included) or ``http.client.HTTPException``."""
        proxy = _proxy_for(origin)
        target = path if proxy is None or origin.scheme == "https" else \
            f"http://{_host_header(origin)}{path}"  # fmt: skip
        headers = proxy[2] if proxy is not None and origin.scheme == "http" else {}
        while not fresh:
            with self._lock:
                idle = self._idle.get(origin)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if conn.sock is not None and not _dropped(conn.sock):
                return Exchange(conn, target, headers, reused=True)
            conn.close()
        conn = self._new(origin, proxy)
        conn.connect()
        return Exchange(conn, target, headers, reused=False)

    def _new(self, origin: Origin, proxy: tuple[str, int, dict[str, str]] | None) -> http.client.HTTPConnection:
        host, port = (proxy[0], proxy[1]) if proxy is not None else (origin.host, origin.port)
        conn: http.client.HTTPConnection
        if origin.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._context_for_tls())
            if proxy is not None:  # a CONNECT tunnel; the certificate is checked against the origin's name
                conn.set_tunnel(origin.host, origin.port, headers=proxy[2])
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        return conn

    def release(self, origin: Origin, conn: http.client.HTTPConnection, reusable: bool) -> None:
        """Keep ``conn`` for the next request to ``origin`` if it finished cleanly, else close it."""
        if reusable and conn.sock is not None:
            with self._lock:
                idle = self._idle.setdefault(origin, [])
                if len(idle) < self._keep:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _host_header(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    default = 443 if origin.scheme == "https" else 80
    return host if origin.port == default else f"{host}:{origin.port}"


class Deadlines:
    """One daemon thread that shuts down the sockets of requests past their deadline (module docstring).

    :meth:`watch` and :meth:`clear` bracket a request. ``clear`` must come before the socket is closed or
    reused: the watchdog shuts sockets down only while it holds the lock that ``clear`` takes, so it never
    touches a socket that has moved on to another request.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cv:
            self._next += 1
            self._due[self._next] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelseal-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
            return self._next

    def clear(self, token: int) -> bool:
        """Stop watching; True if the deadline had passed and the socket was shut down."""
        with self._cv:
            self._due.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                for token, (deadline, sock) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[token]
                        self._fired.add(token)
                        try:  # the plain socket's shutdown: an SSL socket's own would drop its TLS state mid-read
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)
                        except OSError:
                            pass  # already closed
                self._cv.wait(min((d for d, _s in self._due.values()), default=now + 60) - now)


deadlines = Deadlines()
