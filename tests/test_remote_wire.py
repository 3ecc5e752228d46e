"""The HTTP range reader on the wire (``load/remote/http.py`` on ``connections.py``): raw servers that answer
byte by byte as a hostile or unlucky server would, and a real forward proxy (proxy.py).

Each attack or accident has its answer: a kept-alive connection the server closed is replaced without
spending a retry; a server trickling its headers is cut off at the request's deadline (a socket timeout is
per read and never fires); an answer with two Content-Lengths, or with bytes after the range, is an error;
an answer cut off mid-body is resumed at the first missing byte; proxies from the environment are used,
their credentials sent, ``NO_PROXY`` honoured.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.errors import FormatError, UsageError
from modelseal.load.remote.config import settings
from modelseal.load.remote.connections import Origin, deadlines, proxy_for
from modelseal.load.remote.http import RangeReader, _where, pool
from modelseal.recipients.hpke import HpkeIdentity

from .remote_servers import forward_proxy, range_server, scripted_server, went_through

DATA = bytes(range(256)) * 400  # the object every scripted server holds (102,400 bytes)
_RANGE = re.compile(rb"\r\nrange: bytes=(\d+)-(\d+)", re.IGNORECASE)


def asked(head: bytes) -> tuple[int, int]:
    m = _RANGE.search(head)
    assert m is not None, head
    return int(m.group(1)), min(int(m.group(2)), len(DATA) - 1)


def answer_head(a: int, b: int, extra: bytes = b"", length: bool = True) -> bytes:
    cl = b"Content-Length: %d\r\n" % (b - a + 1) if length else b""
    return b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n%s%s\r\n" % (a, b, len(DATA), cl, extra)


def send_range(conn: socket.socket, head: bytes) -> None:
    a, b = asked(head)
    conn.sendall(answer_head(a, b) + DATA[a : b + 1])


def reader(url: str) -> RangeReader:
    return RangeReader(lambda: url + "obj", url + "obj", settings())


def read(r: RangeReader, offset: int, length: int) -> bytes:
    out = bytearray(length)
    r.read_parts(offset, [memoryview(out)[: length // 2], memoryview(out)[length // 2 :]])
    return bytes(out)


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MODELSEAL_REMOTE_RETRIES", "0")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # fmt: skip
    return monkeypatch


@pytest.mark.slow
@pytest.mark.parametrize("how", ["closed_while_idle", "hangs_up_on_the_next_request"])
def test_a_kept_connection_the_server_dropped_costs_no_retry(how: str, no_retries: pytest.MonkeyPatch) -> None:
    """Servers close idle keep-alive connections when they like. One closed while idle is seen before use (it
    is readable); one closed as the next request goes out (a keep-alive timeout racing it) is replaced by a
    new connection once. Neither is a failed load, even with no retries allowed."""
    seen: list[int] = []

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        seen.append(n)
        if how == "hangs_up_on_the_next_request" and n == 1:
            return False  # the second request on a kept connection: hang up without a word
        send_range(conn, head)
        return how != "closed_while_idle"  # answered as kept-alive, then closed at once

    with scripted_server(answer) as url:
        r = reader(url)
        assert r.head(1000) == DATA[:1000]
        time.sleep(0.2)
        assert read(r, 1000, 5000) == DATA[1000:6000]
        assert read(r, 7000, 3000) == DATA[7000:10000]
    assert seen[-1] == 0 if how == "closed_while_idle" else 1 in seen


@pytest.mark.slow
def test_a_server_trickling_its_headers_is_cut_off_at_the_deadline(no_retries: pytest.MonkeyPatch) -> None:
    """A byte of header every 50 ms never trips a read timeout; the request's deadline (timeout + its
    length at 256 KiB/s) cuts it off, and the load fails in seconds, not after hours."""
    no_retries.setenv("MODELSEAL_REMOTE_TIMEOUT", "1")

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nX-Slow: ")
        for _ in range(1200):  # a minute of header, if nobody hangs up
            conn.sendall(b"x")
            time.sleep(0.05)
        return False

    with scripted_server(answer) as url:
        started = time.monotonic()
        with pytest.raises(UsageError, match="slower than 256 KiB/s") as info:
            reader(url).head(1000)
        assert time.monotonic() - started < 6
    assert "\n" not in str(info.value)
    assert deadlines._due == {}  # nothing left watched


def _two_lengths(conn: socket.socket, head: bytes) -> None:
    a, b = asked(head)
    conn.sendall(answer_head(a, b, b"Content-Length: %d\r\n" % (b - a)) + DATA[a : b + 1])


def _extra_bytes_until_close(conn: socket.socket, head: bytes) -> None:
    a, b = asked(head)
    conn.sendall(answer_head(a, b, b"Connection: close\r\n", length=False) + DATA[a : b + 1] + b"more")


def _chunked(conn: socket.socket, head: bytes, extra: bytes = b"") -> None:
    a, b = asked(head)
    body = DATA[a : b + 1] + extra
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 700]), body[i : i + 700]) for i in range(0, len(body), 700))
    conn.sendall(answer_head(a, b, b"Transfer-Encoding: chunked\r\n", length=False) + chunks + b"0\r\n\r\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("send", "error"),
    [
        (_two_lengths, "Content-Length .\\(several\\). does not match"),  # which one would a cache believe?
        (_extra_bytes_until_close, "more bytes than the range"),
        (lambda conn, head: _chunked(conn, head, b"more"), "more bytes than the range"),
        (_chunked, None),  # chunked and exact: fine
    ],
)
def test_answers_that_are_not_exactly_the_range(send: object, error: str | None,
                                                no_retries: pytest.MonkeyPatch) -> None:  # fmt: skip
    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        send(conn, head)  # type: ignore[operator]
        return False

    with scripted_server(answer) as url:
        if error is None:
            assert reader(url).head(5000) == DATA[:5000]
        else:
            with pytest.raises(FormatError, match=error) as info:
                reader(url).head(5000)
            assert "\n" not in str(info.value)


@pytest.mark.slow
def test_an_answer_cut_off_is_resumed_at_the_first_missing_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEAL_REMOTE_RETRIES", "1")
    ranges: list[tuple[int, int]] = []

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        a, b = asked(head)
        ranges.append((a, b))
        if len(ranges) == 2:  # the first payload range: half of it, then hang up
            half = (b - a + 1) // 2
            conn.sendall(answer_head(a, b) + DATA[a : a + half])
            return False
        send_range(conn, head)
        return True

    with scripted_server(answer) as url:
        r = reader(url)
        r.head(100)
        assert read(r, 10_000, 60_000) == DATA[10_000:70_000]
    assert ranges[1] == (10_000, 69_999)
    assert ranges[2][0] > 10_000 and ranges[2][1] == 69_999, ranges  # resumed, not started again
    assert deadlines._due == {}


@pytest.mark.slow
def test_a_load_through_a_real_proxy_with_credentials(tmp_path: Path, host: HpkeIdentity,
                                                      no_retries: pytest.MonkeyPatch) -> None:  # fmt: skip
    """$HTTP_PROXY is used (absolute-form requests through proxy.py), its credentials are sent, wrong ones
    are one clear line, and $NO_PROXY sends a host around the proxy."""
    want = {"w": np.arange(50_000, dtype=np.float32)}
    save_file(want, str(tmp_path / "w.safetensors"))
    modelseal.seal(tmp_path / "w.safetensors", tmp_path / "w.sealed", [host.recipient], segment_size=64 << 10)
    log = tmp_path / "proxy.log"
    with range_server(tmp_path) as (url, _b), forward_proxy("alice:pw", log) as proxy:
        origin = url.split("//")[1].rstrip("/")
        no_retries.setenv("http_proxy", proxy.replace("//", "//alice:pw@"))
        got = modelseal.numpy.load_file(url + "w.sealed", identity=host)
        assert got["w"].tobytes() == want["w"].tobytes()
        assert went_through(log, f"GET {origin}/w.sealed")
        no_retries.setenv("http_proxy", proxy.replace("//", "//alice:wrong@"))
        with pytest.raises(UsageError, match=r"the proxy wants credentials \(HTTP 407\)") as info:
            modelseal.numpy.load_file(url + "w.sealed", identity=host)
        assert "wrong" not in str(info.value) and "\n" not in str(info.value)
        no_retries.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
        no_retries.setenv("no_proxy", "127.0.0.1")
        assert modelseal.numpy.load_file(url + "w.sealed", identity=host)["w"].tobytes() == want["w"].tobytes()


def test_a_proxy_over_tls_is_refused_clearly(no_retries: pytest.MonkeyPatch) -> None:
    no_retries.setenv("http_proxy", "https://proxy.example:3128")
    with pytest.raises(UsageError, match="must be an http:// proxy"):
        reader("http://models.example/").head(10)


@given(st.text(min_size=0, max_size=40), st.text(max_size=20))
def test_any_path_becomes_a_request_target_http_client_sends(path: str, query: str) -> None:
    """Whatever a URL's path and query hold (spaces, control characters, non-ASCII), the request target is
    printable ASCII with no space: a URL can never split the request line or smuggle a header."""
    from urllib.parse import unquote

    url = "https://models.example/" + path.lstrip("/") + (f"?{query}" if query else "")
    origin, target = _where(url, "x")
    assert origin.port == 443 and origin.host == "models.example" and target.startswith("/")
    assert target.isascii() and all(33 <= ord(c) < 127 for c in target), target
    if not set(path) & set("%?#\t\r\n"):  # urlsplit drops tabs and line breaks itself
        assert unquote(target.partition("?")[0]) == "/" + path.lstrip("/")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x", "http://[::1/x", "https://exa\uff0fmple.com@evil/x",
                                 "http://a b/x", "http://evil.example\x0bget\x0c/x", "http://a\x00b/x"])
def test_a_malformed_url_is_one_clear_line(url: str, no_retries: pytest.MonkeyPatch) -> None:
    """Review of the http.client reader: these were raw ValueErrors (port, IPv6, NFKC), retried as transient
    (a space), or reached a proxy's CONNECT line as they were (control characters)."""
    from modelseal.load.remote.source import RemoteSource

    with pytest.raises(UsageError, match=r"not a valid URL|host name is not valid|IPv6") as info:
        RemoteSource(url)
    assert "\n" not in str(info.value) and "\x0b" not in str(info.value)


# -- review of the http.client reader (14c7d8c): each attack that worked then, and fails now


def _bad_chunk_then_a_flood(size: bytes, sent: list[int]) -> object:
    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        a, b = asked(head)
        body = DATA[a : b + 1]
        conn.sendall(answer_head(a, b, b"Transfer-Encoding: chunked\r\n", length=False)
                     + b"%x\r\n%s\r\n" % (len(body), body) + size + b"\r\n")  # fmt: skip
        block = b"\0" * (1 << 20)
        for _ in range(64):  # 64 MiB more, which http.client read into memory for a size of -1
            conn.sendall(block)
            sent[0] += len(block)
        return False

    return answer


@pytest.mark.slow
@pytest.mark.parametrize("size", [b"-1", b"0x10", b"1_0", b"+a", b"-0"])
def test_a_chunk_size_that_is_not_hex_digits_is_refused_before_it_is_read(
    size: bytes, no_retries: pytest.MonkeyPatch
) -> None:
    """H1: ``int(line, 16)`` took ``-1``, and the check for bytes after the range became ``read(-1)``: everything
    the server sent until it stopped, in memory (1 GiB in 24 s in the review)."""
    sent = [0]
    with scripted_server(_bad_chunk_then_a_flood(size, sent)) as url:
        with pytest.raises(UsageError, match="IncompleteRead") as info:
            reader(url).head(4000)
    assert sent[0] < 32 << 20, sent  # the client hung up; it did not swallow the flood
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_proxy_trickling_its_connect_answer_is_cut_off_at_the_deadline(no_retries: pytest.MonkeyPatch) -> None:
    """M1: the connection (and a CONNECT tunnel's answer) was made before the deadline was watched; a proxy
    sending a header line every 50 ms held the load forever."""
    no_retries.setenv("MODELSEAL_REMOTE_TIMEOUT", "1")

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n")
        for i in range(1200):
            conn.sendall(b"X-%d: y\r\n" % i)
            time.sleep(0.05)
        return False

    with scripted_server(answer) as proxy:
        no_retries.setenv("https_proxy", proxy)
        started = time.monotonic()
        with pytest.raises(UsageError, match="slower than"):
            reader("https://models.example/").head(1000)
        assert time.monotonic() - started < 6
    assert deadlines._due == {}


@pytest.mark.slow
def test_a_forked_child_does_not_share_the_parents_connections(no_retries: pytest.MonkeyPatch) -> None:
    """M2: a child made by fork used its parent's kept sockets: two processes on one TCP connection read
    each other's answers (the review saw /b's bytes returned for /a, with no error). The child now starts
    with no kept connection and its own watchdog."""
    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        a, b = asked(head)
        fill = b"B" if b" /b " in head else b"A"
        conn.sendall(answer_head(a, b) + fill * (b - a + 1))
        return True

    pool(settings()).close()  # connections kept by earlier tests
    with scripted_server(answer) as url:
        parent = RangeReader(lambda: url + "a", url + "a", settings())
        assert parent.head(10) == b"A" * 10  # a kept connection now
        assert sum(map(len, pool(settings())._idle.values())) == 1
        pid = os.fork()
        if pid == 0:  # the child: exit status says what it saw
            ok = not pool(settings())._idle and deadlines._thread is None
            ok = ok and RangeReader(lambda: url + "b", url + "b", settings()).head(10) == b"B" * 10
            os._exit(0 if ok else 1)
        assert parent.head(10) == b"A" * 10
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.slow
def test_a_connection_is_kept_per_route_so_proxy_credentials_never_reach_the_origin(
    tmp_path: Path, no_retries: pytest.MonkeyPatch
) -> None:
    """M3: connections were kept per origin only. After $HTTP_PROXY changed, a direct connection was reused
    for a proxy-form request: the origin received the proxy's password."""
    heads: list[bytes] = []

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        heads.append(head)
        send_range(conn, head)
        return True

    with scripted_server(answer) as url, forward_proxy("carol:proxy-secret", tmp_path / "p.log") as proxy:
        assert reader(url).head(10) == DATA[:10]  # direct: a connection kept
        no_retries.setenv("http_proxy", proxy.replace("//", "//carol:proxy-secret@"))
        assert reader(url).head(20) == DATA[:20]  # through the proxy: a new connection
    assert len(heads) == 2
    assert not any(b"proxy-authorization" in h.lower() or b"GET http" in h for h in heads), heads


@pytest.mark.slow
def test_interim_answers_are_skipped_and_server_text_in_messages_is_escaped(no_retries: pytest.MonkeyPatch) -> None:
    """L6: 103 Early Hints (CDNs send it) was taken for the answer. L5: a Content-Encoding with an escape
    sequence went into the message as it was (to the terminal)."""
    mode = ["hints"]

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        a, b = asked(head)
        if mode[0] == "hints":
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 102 Processing\r\n\r\n" + answer_head(a, b) + DATA[a : b + 1])  # fmt: skip
        else:
            conn.sendall(answer_head(a, b, b"Content-Encoding: \x1b[31mred\r\n") + DATA[a : b + 1])
        return False

    with scripted_server(answer) as url:
        assert reader(url).head(300) == DATA[:300]
        mode[0] = "escape"
        with pytest.raises(FormatError, match="Content-Encoding") as info:
            reader(url).head(300)
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


@pytest.mark.slow
def test_framing_other_than_chunked_is_refused(no_retries: pytest.MonkeyPatch) -> None:
    """http.client reads ``Transfer-Encoding: gzip, chunked`` as a raw body: compressed bytes where the
    weights go. Refused by name."""
    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        a, b = asked(head)
        conn.sendall(answer_head(a, b, b"Transfer-Encoding: gzip, chunked\r\n") + DATA[a : b + 1])
        return False

    with scripted_server(answer) as url, pytest.raises(FormatError, match="Transfer-Encoding 'gzip, chunked'"):
        reader(url).head(300)


def test_no_proxy_entries_with_a_port_match(no_retries: pytest.MonkeyPatch) -> None:
    """L8: ``NO_PROXY=host:port`` never matched (only the host was compared)."""
    no_retries.setenv("https_proxy", "http://proxy.example:3128")
    no_retries.setenv("no_proxy", "internal.example:8443")
    assert proxy_for(Origin("https", "internal.example", 8443)) is None
    assert proxy_for(Origin("https", "internal.example", 443)) is not None
    assert proxy_for(Origin("https", "other.example", 8443)) is not None


@pytest.mark.slow
def test_a_name_with_many_dead_addresses_costs_one_deadline_not_one_timeout_each(
    no_retries: pytest.MonkeyPatch,
) -> None:
    """M1: each address a name resolves to got the full timeout (6 dead addresses: 6 timeouts per attempt).
    Now every attempt gets what is left of the request's deadline."""
    # a loopback listener whose accept queue is full: the kernel drops further SYNs, so a connect waits
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(8):
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(("127.0.0.1", port))
            held.append(c)
        except TimeoutError:
            c.close()
            break
    else:
        pytest.skip("the kernel accepted every connection (no full accept queue to wait on)")
    real = socket.getaddrinfo

    def many(host: str, service: int, *args: object, **kw: object) -> list:  # type: ignore[type-arg]
        if host != "models.example":
            return real(host, service, *args, **kw)  # type: ignore[arg-type]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))] * 6

    no_retries.setattr(socket, "getaddrinfo", many)
    no_retries.setenv("MODELSEAL_REMOTE_TIMEOUT", "1")
    started = time.monotonic()
    try:
        with pytest.raises(UsageError, match=r"TimeoutError|slower than"):
            reader("http://models.example/").head(1000)
        assert time.monotonic() - started < 2.5
    finally:
        for c in held:
            c.close()
        listener.close()
