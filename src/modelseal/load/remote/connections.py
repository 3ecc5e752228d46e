"""Kept-alive HTTP/1.1 connections for range reads, on the standard library's ``http.client``.

Why not httpx (which talks to the key service): its HTTP/1.1 connection reads the socket 64 KiB at a
time and hands each piece through h11, httpcore and httpx in Python before the caller copies it out. At
loopback and data-centre speeds that, not decryption, bounded a remote load (docs/benchmarks.md,
"Remote loading"). ``http.client``'s ``readinto`` of a large buffer goes to ``recv_into`` on the socket
with the GIL released, so a range's body lands in the buffer it is decrypted in, with no copy on the way.

``http.client`` only parses here: this module makes every socket itself (connect, proxy tunnel, TLS), so
that all of it is inside the request's deadline, and hands the connected socket to an
``HTTPConnection`` that may never open one of its own. What httpx gave and this keeps:

- a pool of kept-alive connections per origin *and* proxy (a connection made for one route is never
  reused for another, so a proxy's credentials cannot reach the origin); an idle connection the server has
  closed, or that holds bytes nobody asked for, is dropped before it is used; a forked child starts with
  an empty pool (it must not share its parent's sockets);
- TLS with the caller's context (the host name is checked, client certificates for mTLS);
- proxies from ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` (``http://`` proxies, with credentials in
  their URL; ``CONNECT`` tunnels for https:// targets);
- no redirects (``http.client`` follows none).

:class:`Deadlines` bounds a whole request in time, from its first connection attempt to its last byte.
A socket timeout bounds each read only, so a server or proxy sending a byte now and then would hold a
load for hours; past its deadline a request's socket is shut down under it by one watchdog thread, and
the blocked read returns at once.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from modelseal.errors import UsageError

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_LINE = 65536  # http.client's own limit on a line


@dataclass(frozen=True)
class Origin:
    """Where a request goes: ``https`` or ``http``, a host name (ASCII) or address (IPv6 without brackets),
    a port."""

    scheme: str
    host: str
    port: int

    def authority(self) -> str:
        """``host[:port]`` as the Host header and a CONNECT line write it (the port only if not the default)."""
        default = self.port == (443 if self.scheme == "https" else 80)
        return self.hostport().rpartition(":")[0] if default else self.hostport()

    def hostport(self) -> str:
        """``host:port`` with the port always (what ``CONNECT`` and ``NO_PROXY`` matching want)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, from credentials in the proxy's URL


class DeadlinePassedError(TimeoutError):
    """The request ran past its deadline and the watchdog cut its connection."""


class ProxyRefusedError(OSError):
    """The proxy answered a CONNECT with something other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the proxy refused the tunnel (HTTP {status})")
        self.status = status


class RangeResponse(http.client.HTTPResponse):
    """``http.client``'s answer, stricter where a server could abuse it.

    - A chunk-size line must be 1-16 hex digits (an optional ``;extension`` after): CPython 3.11 takes
      ``int(line, 16)``, so ``-1`` became a read of everything until the server stops, into memory.
    - Interim answers (102 Processing, 103 Early Hints) are skipped like 100 Continue, not taken for the
      answer; their number is bounded by the request's deadline.
    """

    def _read_next_chunk_size(self) -> int:
        assert self.fp is not None
        line = self.fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("chunk size")
        size = line.split(b";", 1)[0].strip(b" \t\r\n")
        if not _CHUNK_SIZE.fullmatch(size):
            raise ValueError("not a chunk size")  # http.client turns it into IncompleteRead
        return int(size, 16)

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not (101 < status < 200):
                return version, status, reason
            http.client.parse_headers(self.fp)  # type: ignore[arg-type]  # the interim answer's headers


@dataclass
class Exchange:
    """One request's connection, already watched by :data:`deadlines`: the request target to send (a
    path, or the absolute URL through a plain-HTTP proxy), headers the proxy needs, whether the connection
    served an earlier request, and where it goes back to."""

    conn: http.client.HTTPConnection
    target: str
    proxy_headers: dict[str, str]
    reused: bool
    route: tuple[Origin, Proxy | None]
    watch: int


def proxy_for(origin: Origin) -> Proxy | None:
    """The proxy the environment names for this origin, or None."""
    proxies = getproxies_environment()
    url = proxies.get(origin.scheme)
    if not url or proxy_bypass(origin.host) or proxy_bypass(origin.hostport()):
        return None
    name = f"${origin.scheme.upper()}_PROXY"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise UsageError(f"{name} must be an http:// proxy (host and port); modelseal does not speak TLS to a proxy")
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"{name} has an invalid port") from None
    return Proxy(parts.hostname, port, basic_authorization(parts))


def basic_authorization(parts: SplitResult) -> str | None:
    """The HTTP Basic authorization for credentials in a URL's user part (as browsers and curl send them),
    or None without them: for a proxy's URL and for the object's own."""
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _dropped(sock: socket.socket) -> bool:
    """True if an idle kept-alive socket is readable: the server closed it, or sent bytes nobody asked for
    (either way it cannot carry the next request)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _dial(host: str, port: int, timeout: float, deadline: float) -> socket.socket:
    """A TCP connection to the first address of ``host`` that answers; each attempt gets the socket timeout
    or what is left of the deadline, whichever is less (a name with many dead addresses would otherwise cost
    a timeout each)."""
    failure: OSError | None = None
    for family, kind, proto, _name, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(timeout, left))
            sock.connect(address)
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    raise failure or DeadlinePassedError("no connection before the request's deadline")


def _tunnel(sock: socket.socket, origin: Origin, proxy: Proxy) -> None:
    """``CONNECT`` through ``proxy`` to ``origin``; its answer is parsed by ``http.client`` (bounded lines
    and header count) and the wait is inside the request's deadline."""
    where = origin.hostport()
    lines = [f"CONNECT {where} HTTP/1.1", f"Host: {where}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    answer = http.client.HTTPResponse(sock, method="CONNECT")
    try:
        answer.begin()
    finally:
        answer.close()  # the socket itself stays open for TLS
    if answer.status != 200:
        raise ProxyRefusedError(answer.status)


_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    """Idle connections per route (origin and proxy), for one set of TLS settings and timeouts."""

    def __init__(self, tls: Callable[[], ssl.SSLContext], timeout: float, keep: int) -> None:
        self._tls = tls  # made on first https:// use (loading a CA bundle costs milliseconds)
        self._context: ssl.SSLContext | None = None
        self._timeout = timeout
        self._keep = keep
        self._idle: dict[tuple[Origin, Proxy | None], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        _pools.add(self)

    def _context_for_tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                self._context = self._tls()
            return self._context

    def open(self, origin: Origin, path: str, deadline: float, fresh: bool = False) -> Exchange:
        """A connection to ``origin`` (an idle one unless ``fresh``), watched until ``deadline``, and what to
        send on it. Raises ``OSError`` (``ssl.SSLError``, :class:`DeadlinePassedError` and
        :class:`ProxyRefusedError` included) or ``http.client.HTTPException``."""
        proxy = proxy_for(origin)
        route = (origin, proxy)
        target, headers = path, {}
        if proxy is not None and origin.scheme == "http":  # absolute-form through the proxy, its credentials
            target = f"http://{origin.authority()}{path}"
            headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else {}
        while not fresh:
            with self._lock:
                idle = self._idle.get(route)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if conn.sock is not None and not _dropped(conn.sock):
                return Exchange(conn, target, headers, True, route, deadlines.watch(conn, deadline))
            conn.close()
        conn = http.client.HTTPConnection(origin.host, origin.port, timeout=self._timeout)
        conn.auto_open = 0  # type: ignore[attr-defined]  # never a socket of its own: only the ones made below
        conn.response_class = RangeResponse
        watch = deadlines.watch(conn, deadline)
        try:
            conn.sock = _dial(*((proxy.host, proxy.port) if proxy else (origin.host, origin.port)), self._timeout,
                              deadline)  # fmt: skip
            if time.monotonic() >= deadline:  # it fired while there was no socket to cut: cut nothing, stop here
                raise DeadlinePassedError
            if origin.scheme == "https":
                if proxy is not None:
                    _tunnel(conn.sock, origin, proxy)
                tls = self._context_for_tls().wrap_socket(conn.sock, server_hostname=origin.host,
                                                          do_handshake_on_connect=False)  # fmt: skip
                conn.sock = tls  # watched from here on (the plain socket is detached)
                tls.do_handshake()
        except BaseException as exc:
            cut = deadlines.clear(watch)
            conn.close()
            if cut and isinstance(exc, Exception):
                raise DeadlinePassedError("the connection was not made before the request's deadline") from None
            raise
        return Exchange(conn, target, headers, False, route, watch)

    def release(self, ex: Exchange, reusable: bool) -> None:
        """Keep the exchange's connection for the next request on its route if it finished cleanly, else
        close it. Its watch must have been cleared."""
        if reusable and ex.conn.sock is not None:
            with self._lock:
                idle = self._idle.setdefault(ex.route, [])
                if len(idle) < self._keep:
                    idle.append(ex.conn)
                    return
        ex.conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    def _forget_after_fork(self) -> None:
        """In a forked child: close this process's copies of the kept sockets (the parent keeps using
        its own; sharing one TCP connection would mix the two processes' answers)."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()  # closes this process's descriptor only; an SSL socket sends no alert on close


class Deadlines:
    """One daemon thread that shuts down the sockets of requests past their deadline (module docstring).

    :meth:`watch` and :meth:`clear` bracket a request. ``clear`` must come before the connection is closed
    or reused: the watchdog acts only while it holds the lock that ``clear`` takes, so it never touches a
    socket that has moved on to another request. It shuts down whatever socket the connection holds at
    that moment (the plain one while connecting, the TLS one after).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty, with no thread yet (also what a forked child needs: the parent's thread is not there)."""
        self._cv = threading.Condition()
        self._due: dict[int, tuple[float, http.client.HTTPConnection]] = {}
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def watch(self, conn: http.client.HTTPConnection, deadline: float) -> int:
        with self._cv:
            self._next += 1
            self._due[self._next] = (deadline, conn)
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
                for token, (deadline, conn) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[token]
                        self._fired.add(token)
                        _cut(conn.sock)
                self._cv.wait(min((d for d, _c in self._due.values()), default=now + 60) - now)


def _cut(sock: socket.socket | None) -> None:
    """Shut a socket down for both directions, which wakes a read blocked on it. The plain socket's
    ``shutdown``: an SSL socket's own would drop its TLS state under the thread reading it."""
    if sock is None or sock.fileno() < 0:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already closed


deadlines = Deadlines()


def _after_fork_in_child() -> None:
    deadlines.reset()
    for pool in list(_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
