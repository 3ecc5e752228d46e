"""One line, naming the address and the fix, for every reason a service cannot listen (key service, serve)."""

from __future__ import annotations

import socket

import pytest

from modelseal.errors import UsageError
from modelseal.listening import bind_tcp, cannot_listen, check_free, split_address


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
    with pytest.raises(UsageError, match=r"bad listen address 'localhost:http' \(HOST:PORT\)"):
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
