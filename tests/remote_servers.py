"""Real servers for the remote-loading tests and bench/remote.py: an HTTP range server (aiohttp) that can
be made hostile or slow, and moto's S3 server. Run standalone for the bench::

    python tests/remote_servers.py http ROOT PORT [--rate BYTES_PER_S]

(moto's own ``moto_server -H 127.0.0.1 -p PORT`` is the S3 server there.)
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

MODES = ("ok", "status200", "wrong_range", "lying_range", "short", "flip", "flaky", "reset", "gzip", "redirect",
         "huge_range", "trickle")  # fmt: skip


@dataclass
class Behaviour:
    """What the range server does now (tests switch it between requests)."""

    mode: str = "ok"
    flaky_left: int = 0  # "flaky"/"reset": how many more requests fail before it serves normally
    flip_at: int | None = None  # "flip": absolute offset of the byte to flip
    rate: float | None = None  # bytes per second over all connections (None: as fast as it goes)
    requests: list[tuple[str, int, int]] = field(default_factory=list)  # (path, first, last) served
    token: str | None = None  # if set, every request needs "Authorization: Bearer <token>" (else 401)
    auth_seen: list[str | None] = field(default_factory=list)  # the Authorization header of every request
    _sent: float = 0.0
    _start: float = 0.0

    async def throttle(self, n: int) -> None:
        """Hold the bytes sent to ``rate``, counted from the first byte (an idle server earns no credit)."""
        if self.rate is None:
            return
        if self._sent == 0:
            self._start = time.monotonic()
        self._sent += n
        ahead = self._sent / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            await asyncio.sleep(ahead)


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def make_app(root: Path, behaviour: Behaviour) -> web.Application:
    async def serve(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["path"]).resolve()
        if root.resolve() not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        size = path.stat().st_size
        m = _RANGE.fullmatch(request.headers.get("Range", ""))
        mode = behaviour.mode
        if mode in ("flaky", "reset") and behaviour.flaky_left > 0:
            behaviour.flaky_left -= 1
            if mode == "flaky":
                raise web.HTTPServiceUnavailable()
        if m is None or mode == "status200":
            first, last, status = 0, size - 1, 200
        else:
            first = int(m.group(1))
            last = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if first >= size:
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
            status = 206
        behaviour.requests.append((request.match_info["path"], first, last))
        if mode == "redirect":  # to plain http on another port: a downgrade, or an internal address
            raise web.HTTPFound("http://127.0.0.1:9/" + request.match_info["path"])
        if mode == "huge_range":  # int() of a 5,000-digit number raises ValueError
            return web.Response(status=206, body=b"x", headers={"Content-Range": f"bytes 0-0/{'9' * 5000}"})
        send_first, claimed_first = first, first
        if mode == "wrong_range" and status == 206 and first > 0:
            claimed_first = send_first = first - 1  # an honest header for another range
        if mode == "lying_range" and status == 206 and first >= 4096:
            send_first = first - 4096  # other bytes under the header of the requested range
        length = last - claimed_first + 1
        body_len = length - 1 if mode == "short" and length > 1 else length
        resp = web.StreamResponse(status=status)
        resp.headers["Content-Length"] = str(body_len)
        resp.headers["Accept-Ranges"] = "bytes"
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {claimed_first}-{last}/{size}"
        if mode == "gzip":
            resp.headers["Content-Encoding"] = "gzip"
        await resp.prepare(request)
        with path.open("rb") as f:
            pos, end = send_first, send_first + body_len
            while pos < end:
                chunk = bytearray(os.pread(f.fileno(), min(1 << 20, end - pos), pos))
                if not chunk:
                    break
                if mode == "flip" and behaviour.flip_at is not None and pos <= behaviour.flip_at < pos + len(chunk):
                    chunk[behaviour.flip_at - pos] ^= 0x01
                if mode == "reset" and behaviour.flaky_left >= 0 and pos > send_first:
                    behaviour.flaky_left = -1  # cut one answer off mid-body, once
                    request.transport.close() if request.transport else None
                    return resp
                if mode == "trickle":  # a little every 10 ms: never idle long enough for a read timeout
                    for i in range(0, len(chunk), 64):
                        await resp.write(bytes(chunk[i : i + 64]))
                        await asyncio.sleep(0.01)
                else:
                    await behaviour.throttle(len(chunk))
                    await resp.write(bytes(chunk))
                pos += len(chunk)
        await resp.write_eof()
        return resp

    async def static(request: web.Request) -> web.StreamResponse:
        """Honest and fast: aiohttp's own file response (Range support, sendfile)."""
        if behaviour.mode != "ok" or behaviour.rate is not None:
            return await serve(request)
        path = (root / request.match_info["path"]).resolve()
        if root.resolve() not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        m = _RANGE.fullmatch(request.headers.get("Range", ""))
        if m:
            last = int(m.group(2)) if m.group(2) else path.stat().st_size - 1
            behaviour.requests.append((request.match_info["path"], int(m.group(1)), last))
        return web.FileResponse(path)

    @web.middleware
    async def bearer(request: web.Request, handler: Any) -> web.StreamResponse:
        behaviour.auth_seen.append(request.headers.get("Authorization"))
        if behaviour.token is not None and request.headers.get("Authorization") != f"Bearer {behaviour.token}":
            raise web.HTTPUnauthorized()
        return await handler(request)  # type: ignore[no-any-return]

    app = web.Application(middlewares=[bearer])
    app.router.add_get("/{path:.+}", static)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def range_server(root: Path, behaviour: Behaviour | None = None,
                 tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, Behaviour]]:  # fmt: skip
    """The range server on a free loopback port in a thread of its own event loop: (base URL, behaviour).
    With ``tls`` (a server context: its certificate, and a client CA if it requires client certificates)
    it serves https://."""
    behaviour = behaviour or Behaviour()
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(root, behaviour), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/", behaviour
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


Answer = Any  # Callable[[socket.socket, bytes, int], bool]: (connection, request head, n-th request on it)


@contextmanager
def scripted_server(answer: Answer, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A raw HTTP/1.1 server on a free loopback port whose answers are written byte by byte by ``answer``
    (wrong, trickled, cut off or kept alive as a test needs): its base URL. ``answer`` gets each request's
    head (request line and headers) and how many requests came before it on the same connection, and returns
    whether to keep the connection for another request. With ``tls`` (a server context) it speaks https."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        if tls is not None:
            try:
                conn = tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            buf, n = b"", 0
            while not stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                try:
                    if not answer(conn, head, n):
                        return
                except OSError:  # the client hung up (a test's deadline, say)
                    return
                n += 1

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
    finally:
        stop.set()
        listener.close()


@contextmanager
def forward_proxy(credentials: str, log: Path) -> Iterator[str]:
    """proxy.py (a real forward proxy from the package index: ``CONNECT`` tunnels and absolute-form requests)
    on a free loopback port, requiring HTTP Basic ``credentials`` (``user:password``); its access log goes to
    ``log``. Its URL, without the credentials."""
    import subprocess

    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port), "--basic-auth",
           credentials, "--num-workers", "1", "--num-acceptors", "1"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"proxy.py exited at start: {log.read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def went_through(log: Path, line: str) -> bool:
    """Whether proxy.py logged ``line``. It logs a connection when the connection ends, so this process's
    kept-alive range connections are closed first."""
    from modelseal.load.remote.config import settings
    from modelseal.load.remote.http import pool

    pool(settings()).close()
    for _ in range(100):
        if line in log.read_text():
            return True
        time.sleep(0.05)
    return False


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server (``ThreadedMotoServer``) on a free loopback port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class S3Faults:
    """What the S3 proxy does to multipart uploads (tests switch it between seals)."""

    refuse_after: int | None = None  # UploadPart requests passed on before the proxy refuses the rest (403)
    part_delay: float = 0.0  # seconds each UploadPart waits before it is passed on (time to send a signal)
    parts: int = 0  # UploadPart requests seen
    refused: int = 0

    def reset(self) -> None:
        self.refuse_after, self.part_delay, self.parts, self.refused = None, 0.0, 0, 0


_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                  b"<Message>Access Denied</Message></Error>")  # fmt: skip
_HOP = {"host", "transfer-encoding", "connection", "keep-alive", "content-length"}


@contextmanager
def s3_proxy(endpoint: str, faults: S3Faults) -> Iterator[str]:
    """A reverse proxy in front of an S3 server that can refuse or slow down UploadPart requests (a real
    failure in the middle of a multipart upload, as a store's quota or a revoked credential gives):
    everything else is passed on unchanged. Its endpoint URL."""
    import aiohttp

    session: list[aiohttp.ClientSession] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT" and "partNumber" in request.query and "uploadId" in request.query:
            faults.parts += 1
            if faults.part_delay:
                await asyncio.sleep(faults.part_delay)
            if faults.refuse_after is not None and faults.parts > faults.refuse_after:
                faults.refused += 1
                return web.Response(status=403, body=_ACCESS_DENIED, content_type="application/xml")
        if not session:
            session.append(aiohttp.ClientSession(auto_decompress=False))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session[0].request(request.method, endpoint + request.path_qs, headers=headers, data=body,
                                      allow_redirects=False) as r:  # fmt: skip
            data = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
            if request.method == "HEAD":  # no body, but the object's length is the answer
                out["Content-Length"] = r.headers.get("Content-Length", "0")
                return web.Response(status=r.status, headers=out)
            return web.Response(status=r.status, body=data, headers=out)

    async def close(_app: web.Application) -> None:
        if session:
            await session[0].close()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{path:.*}", forward)
    app.on_cleanup.append(close)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] != "http":
        raise SystemExit(__doc__)
    root, port = Path(sys.argv[2]), int(sys.argv[3])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--rate" else None
    web.run_app(make_app(root, Behaviour(rate=rate)), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
