"""Listening addresses: parse ``HOST:PORT``, and say in one line why a port cannot be listened on.

The key service and ``modelseal serve`` both bind TCP ports an operator chose; a port that is taken, a
host name that does not resolve or an address the machine does not have must end in one line naming
the address and what to change, never a traceback. (The agent's Unix socket has its own rules, in
:mod:`modelseal.agent.listener`.)
"""

from __future__ import annotations

import errno
import socket

from modelseal.errors import UsageError

_WHY = {
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such local address",
}


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is loopback) as ``(host, port)``.

    The port must be ASCII digits in 0-65535: ``int()`` alone takes ``'８０８９'`` and ``' 80'``, and a
    port past 65535 would end in the socket layer's OverflowError traceback instead of this line."""
    host, _, port = address.rpartition(":")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise UsageError(f"bad listen address {address!r} (HOST:PORT, port 0-65535)")
    return host.strip("[]") or "127.0.0.1", int(port)


def normalise_address(address: str) -> str:
    """``address`` checked and written the way every listener takes it: ``host:port`` with the empty host
    made loopback and an IPv6 host in brackets (gRPC refuses ``:PORT``; aiohttp and gRPC then bind the
    very address :func:`check_free` checked)."""
    host, port = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cannot_listen(what: str, address: str, exc: OSError | None, fix: str) -> UsageError:
    """The one-line error for ``what`` (``the key service``, ``HTTP``...) failing to listen on ``address``.

    ``exc`` is the bind's error (None: the library only said it could not bind); ``fix`` says what the
    operator can change (a flag, a config line).
    """
    port = split_address(address)[1]
    if exc is None:
        reason = f"port {port} cannot be bound"
    elif isinstance(exc, socket.gaierror):
        reason = exc.strerror or str(exc)
    elif exc.errno == errno.EADDRINUSE:
        reason, fix = f"port {port} is already in use", f"stop the other server or {fix}"
    else:
        reason = f"port {port}: {_WHY.get(exc.errno or 0, exc.strerror or str(exc))}"
    return UsageError(f"cannot listen for {what} on {address}: {reason}; {fix}")


def bind_tcp(address: str, what: str, fix: str, backlog: int = 1024) -> socket.socket:
    """A listening socket on ``address``, or :func:`cannot_listen`'s error."""
    host, port = split_address(address)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise cannot_listen(what, address, exc, fix) from None


def check_free(address: str, what: str, fix: str) -> None:
    """Bind ``address`` once and let it go, so that a port in use is one line before anything starts
    (for servers a library binds later, such as gRPC's C core, which would log its own error first)."""
    with bind_tcp(address, what, fix, backlog=1):
        pass
