"""The agent's unix socket, bounded so that no local user can starve the others (root included).

Connections are accepted by a plain non-blocking accept loop rather than ``asyncio.start_unix_server``:
each new connection's peer uid is read (``SO_PEERCRED``) and checked against :class:`Limits` before
any transport, reader or task exists, and a refused connection costs one ``send`` of an error line and
one ``close``. A flood of thousands of connections from one uid therefore keeps the event loop free and
the listen queue short, and root's connection, which waits in the same queue, is served in
milliseconds. Admitted connections get asyncio streams and a deadline for their request
(:class:`modelseal.agent.daemon.Agent` reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import UsageError
from modelseal.release.wire import MAX_REQUEST, error_frame

log = logging.getLogger("modelseal.agent")
_PEERCRED = struct.Struct("3i")
BACKLOG = 1024  # listen queue (the kernel caps it at net.core.somaxconn): room for a burst of loaders
ACCEPT_PAUSE_S = 0.5  # out of descriptors: stop accepting this long, then try again

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, int], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """What one local user can hold of the agent's socket (the ``[limits]`` table of the config).

    ``reserved_connections`` of ``max_connections`` are kept for root, the agent's own user and
    ``admin_uid``, so a flood by any other user leaves them served; each other uid holds at most
    ``max_connections_per_uid``. A request line must arrive within ``request_timeout_s`` of connecting
    (a slow or idle client is answered ``timeout`` and closed)."""

    max_connections: int = 512
    max_connections_per_uid: int = 64
    reserved_connections: int = 32
    request_timeout_s: float = 5.0
    admin_uid: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.reserved_connections < self.max_connections:
            raise UsageError("[limits] reserved_connections must be at least 0 and below max_connections")
        if self.max_connections_per_uid < 1 or self.request_timeout_s <= 0:
            raise UsageError("[limits] max_connections_per_uid must be at least 1 and request_timeout_s above 0")

    def privileged(self) -> frozenset[int]:
        """Root, the agent's own user and the admin user: they may use the reserve and ask for status."""
        return frozenset({0, os.getuid(), *(() if self.admin_uid is None else (self.admin_uid,))})


class Gate:
    """Counts open connections per uid; :meth:`enter` says why a new one is refused, or admits it."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.privileged = limits, limits.privileged()
        self.total = 0
        self.by_uid: dict[int, int] = {}

    def enter(self, uid: int) -> str | None:
        lim = self.limits
        if self.total >= lim.max_connections:
            return f"the agent already has its maximum of {lim.max_connections} connections open; try again"
        if uid not in self.privileged:
            if self.by_uid.get(uid, 0) >= lim.max_connections_per_uid:
                return f"uid {uid} already has {lim.max_connections_per_uid} connections open to the agent"
            if self.total >= lim.max_connections - lim.reserved_connections:
                return "the agent's connections are all in use (the rest are reserved for its administrators)"
        self.total += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        return None

    def leave(self, uid: int) -> None:
        self.total -= 1
        left = self.by_uid[uid] - 1
        if left:
            self.by_uid[uid] = left
        else:
            del self.by_uid[uid]


class Listener:
    """A listening unix socket at ``path`` whose admitted connections go to ``handler(reader, writer, pid, uid)``."""

    def __init__(self, path: Path, mode: int, limits: Limits, handler: Handler) -> None:
        self.path, self.mode, self.handler = path, mode, handler
        self.gate = Gate(limits)
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def open(self) -> None:
        """Bind and listen (mode ``mode`` from the start: no window where others could connect).

        The socket is bound under a temporary name and renamed into place once it listens, so a client
        that sees the path never gets "connection refused" from an agent that is still starting.
        """
        _claim(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.starting")
        old_umask = os.umask(0o177)
        try:
            staging.unlink(missing_ok=True)
            sock.bind(str(staging))
            os.chmod(staging, self.mode)
            sock.listen(BACKLOG)
            os.rename(staging, self.path)
        except OSError as exc:
            sock.close()
            staging.unlink(missing_ok=True)
            raise UsageError(f"cannot listen on the agent socket {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(BACKLOG):  # drain the queue in one go
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for descriptors to be freed
                log.error("accept() on %s failed: %s; pausing %g s", self.path, exc.strerror, ACCEPT_PAUSE_S)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE_S, self._resume)
                return
            self._admit(conn)

    def _resume(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            conn.close()
            return
        refusal = self.gate.enter(uid)
        if refusal is not None:  # told why at once, unread: a flood costs one send and one close each
            log.warning("pid %d uid %d: connection refused: %s", pid, uid, refusal)
            try:
                conn.send(error_frame("busy", refusal))
            except OSError:
                pass
            conn.close()
            return
        task = self._loop.create_task(self._serve(conn, pid, uid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, pid: int, uid: int) -> None:
        try:
            reader = asyncio.StreamReader(limit=MAX_REQUEST)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await self._loop.connect_accepted_socket(lambda: protocol, conn)
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            try:
                await self.handler(reader, writer, pid, uid)
            finally:
                writer.close()
                # a client gone mid-answer leaves its broken pipe in the stream's "closed" future: awaited
                # here, or asyncio logs "Future exception was never retrieved" with a traceback at exit
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1)
        except OSError:  # the client left before its transport was set up
            conn.close()
        finally:
            self.gate.leave(uid)

    async def close(self) -> None:
        """Stop accepting, end open exchanges, remove the socket file."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.path.unlink(missing_ok=True)


def _claim(path: Path) -> None:
    """Make ``path`` ready for a new listening socket: its directory exists, no other agent listens there."""
    if not path.parent.is_dir():
        raise UsageError(
            f"the agent socket directory {path.parent} does not exist: create it (systemd: RuntimeDirectory=) "
            "or change `socket` in the agent config"
        )
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise UsageError(f"another agent is already listening on {path}; stop it first")
        path.unlink()
