"""One line, naming the address and the fix, for every reason a service cannot listen (key service, serve)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelseal.errors import UsageError
from modelseal.listening import bind_tcp, cannot_listen, check_free, normalise_address, split_address


def test_a_taken_port_names_the_port_and_the_fix() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UsageError) as refused:
            bind_tcp(f"127.0.0.1:{port}", "the key service", "change [server] listen in ks.toml")
        assert str(refused.value) == (
            f"cannot listen for the key service on 127.0.0.1:{port}: port {port} is already in use; "
            "stop the other server or change [server] listen in ks.toml"
        )
        with pytest.raises(UsageError, match=f"cannot listen for gRPC on 127.0.0.1:{port}: port {port} is already"):
            check_free(f"127.0.0.1:{port}", "gRPC", "pick another port with --grpc")


def test_unresolvable_hosts_foreign_addresses_and_bad_syntax_are_one_line() -> None:
    with pytest.raises(UsageError, match=r"cannot listen for HTTP on no-such-host\.invalid:8000: .*; fix") as r:
        bind_tcp("no-such-host.invalid:8000", "HTTP", "fix")
    assert "\n" not in str(r.value)
    with pytest.raises(UsageError, match=r"on 192\.0\.2\.1:8000: port 8000: no such local address; fix"):
        bind_tcp("192.0.2.1:8000", "HTTP", "fix")  # TEST-NET-1: never a local address
    with pytest.raises(UsageError, match=r"bad listen address 'localhost:http' \(HOST:PORT, port 0-65535\)"):
        split_address("localhost:http")
    assert split_address("[::1]:9") == ("::1", 9) and split_address(":9") == ("127.0.0.1", 9)
    unbound = cannot_listen("gRPC", "0.0.0.0:1", None, "fix")
    assert str(unbound) == "cannot listen for gRPC on 0.0.0.0:1: port 1 cannot be bound; fix"


def test_a_free_port_is_released_after_the_check() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    check_free(f"127.0.0.1:{port}", "HTTP", "fix")
    with bind_tcp(f"127.0.0.1:{port}", "HTTP", "fix") as again:  # the check let it go
        assert again.getsockname()[1] == port


BAD_PORTS = ["127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:８０８９", "h: 80", "h:+80", "h:"]


@pytest.mark.parametrize("address", BAD_PORTS)
def test_a_port_that_is_not_ascii_digits_0_65535_is_one_usage_line(address: str) -> None:
    with pytest.raises(UsageError) as refused:
        split_address(address)
    assert str(refused.value) == f"bad listen address {address!r} (HOST:PORT, port 0-65535)"
    with pytest.raises(UsageError, match="bad listen address"):  # the socket layer never sees it
        bind_tcp(address, "HTTP", "fix")


def test_listeners_get_host_port_with_loopback_for_an_empty_host_and_ipv6_in_brackets() -> None:
    assert normalise_address(":8001") == "127.0.0.1:8001"  # gRPC refuses ':8001'
    assert normalise_address("[::1]:0") == "[::1]:0" and normalise_address("0.0.0.0:65535") == "0.0.0.0:65535"
    with pytest.raises(UsageError, match=r"bad listen address ':99999'"):
        normalise_address(":99999")


def test_serve_hands_grpc_and_http_the_normalised_address(tmp_path: Path) -> None:
    from modelseal.serve.server import ServeConfig, Server

    (tmp_path / "repo").mkdir()
    server = Server(ServeConfig(tmp_path / "repo", http=":8000", grpc="[::1]:8001", identity=None))
    assert (server.config.http, server.config.grpc) == ("127.0.0.1:8000", "[::1]:8001")
    with pytest.raises(UsageError, match=r"bad listen address '127\.0\.0\.1:99999'"):
        Server(ServeConfig(tmp_path / "repo", http="127.0.0.1:99999"))
