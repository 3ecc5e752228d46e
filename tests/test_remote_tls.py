"""Loading over HTTPS from a real TLS range server (aiohttp with an ``ssl`` context) started by the test,
with a throwaway CA, server and client certificates made with ``cryptography``.

A bearer token and mTLS each open the door, and each failure is one clear line, never retried for
nothing: a wrong or missing token (HTTP 401), no client certificate (the server refuses the handshake),
a server certificate nobody trusts. The token never reaches a host that ``MODELSEAL_HTTP_TOKEN_HOSTS``
does not list, even when that host serves the same model over HTTPS.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.errors import UsageError
from modelseal.recipients.hpke import HpkeIdentity

from .remote_servers import Behaviour, forward_proxy, range_server, scripted_server, went_through

pytestmark = pytest.mark.slow
TOKEN = "s3cr3t-token-value"  # a test token


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False, client: bool = False) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (issuer[0], issuer[1]) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    if ca:
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)  # fmt: skip
        b = b.add_extension(usage, True)
    return b.sign(signing_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return path


class Pki:
    """A server CA and certificate for 127.0.0.1, a client CA and a client certificate, another CA."""

    def __init__(self, root: Path) -> None:
        keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client_ca", "client", "rogue")}
        self.ca = _write(root / "ca.pem", _cert("test server CA", keys["ca"], None, ca=True))
        self.server = _write(root / "server.pem", _cert("127.0.0.1", keys["server"], ("test server CA", keys["ca"]),
                                                        server=True), keys["server"])  # fmt: skip
        self.client_ca = _write(root / "client-ca.pem", _cert("test client CA", keys["client_ca"], None, ca=True))
        self.client = _write(root / "client.pem", _cert("host-1", keys["client"], ("test client CA", keys["client_ca"]),
                                                        client=True), keys["client"])  # fmt: skip
        self.rogue_ca = _write(root / "rogue-ca.pem", _cert("someone else's CA", keys["rogue"], None, ca=True))

    def server_context(self, require_client: bool, tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server, self.server.with_suffix(".key"))
        if require_client:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.client_ca)
        return ctx


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, host: HpkeIdentity) -> Path:
    root = tmp_path_factory.mktemp("tls")
    save_file(tensors(), str(root / "w.safetensors"))
    modelseal.seal(root / "w.safetensors", root / "w.sealed.safetensors", [host.recipient], segment_size=64 << 10)
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"a": rng.standard_normal((300, 300)).astype(np.float32), "b": np.arange(10, dtype=np.int64)}


def same(got: dict[str, np.ndarray]) -> None:
    want = tensors()
    assert sorted(got) == sorted(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> Iterator[pytest.MonkeyPatch]:
    for name in ("MODELSEAL_HTTP_BEARER_TOKEN", "MODELSEAL_HTTP_TOKEN_FILE", "MODELSEAL_HTTP_TOKEN_HOSTS",
                 "MODELSEAL_HTTP_CLIENT_CERT", "MODELSEAL_HTTP_CLIENT_KEY", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)  # fmt: skip
    monkeypatch.setenv("MODELSEAL_HTTP_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("MODELSEAL_REMOTE_RETRIES", "1")
    yield monkeypatch


def host_port(url: str) -> str:
    return url.split("//")[1].split("/")[0]


def test_a_bearer_token_opens_a_tls_server_and_a_wrong_one_is_one_line(site: Path, pki: Pki, host: HpkeIdentity,
                                                                       env: pytest.MonkeyPatch) -> None:  # fmt: skip
    with range_server(site, Behaviour(token=TOKEN), tls=pki.server_context(False)) as (url, behaviour):
        env.setenv("MODELSEAL_HTTP_TOKEN_HOSTS", host_port(url))
        env.setenv("MODELSEAL_HTTP_BEARER_TOKEN", TOKEN)
        same(modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host))
        assert behaviour.auth_seen and set(behaviour.auth_seen) == {f"Bearer {TOKEN}"}
        for token in ("wrong-token", None):
            if token is None:
                env.delenv("MODELSEAL_HTTP_BEARER_TOKEN")
            else:
                env.setenv("MODELSEAL_HTTP_BEARER_TOKEN", token)
            behaviour.auth_seen.clear()
            with pytest.raises(UsageError, match=r"access denied \(HTTP 401\): set \$MODELSEAL_HTTP_BEARER_TOKEN") as e:
                modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host)
            assert "\n" not in str(e.value) and TOKEN not in str(e.value) and "wrong-token" not in str(e.value)
            assert len(behaviour.auth_seen) == 1  # a 401 is not retried


def test_the_token_never_reaches_an_unlisted_host(site: Path, pki: Pki, host: HpkeIdentity,
                                                  env: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Two HTTPS servers hold the same model; the token is for the first only. The second gets no
    Authorization header at all (a load from it works where it needs none, and is a 401 where it does)."""
    ctx = pki.server_context(False)
    with range_server(site, Behaviour(token=TOKEN), tls=ctx) as (listed, _b1), \
            range_server(site, Behaviour(), tls=ctx) as (other, seen):  # fmt: skip
        env.setenv("MODELSEAL_HTTP_TOKEN_HOSTS", host_port(listed))
        env.setenv("MODELSEAL_HTTP_BEARER_TOKEN", TOKEN)
        same(modelseal.numpy.load_file(listed + "w.sealed.safetensors", identity=host))
        same(modelseal.numpy.load_file(other + "w.sealed.safetensors", identity=host))
        assert seen.auth_seen and set(seen.auth_seen) == {None}
        seen.token = TOKEN  # the unlisted host asks for it: it is still not sent
        with pytest.raises(UsageError, match=r"HTTP 401"):
            modelseal.numpy.load_file(other + "w.sealed.safetensors", identity=host)
        assert set(seen.auth_seen) == {None}


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_mtls_loads_with_a_client_certificate_and_refuses_without(
    site: Path, pki: Pki, host: HpkeIdentity, env: pytest.MonkeyPatch, version: str
) -> None:
    with range_server(site, tls=pki.server_context(True, tls12=version == "TLSv1.2")) as (url, behaviour):
        env.setenv("MODELSEAL_HTTP_CLIENT_CERT", str(pki.client))
        env.setenv("MODELSEAL_HTTP_CLIENT_KEY", str(pki.client.with_suffix(".key")))
        same(modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host))
        env.delenv("MODELSEAL_HTTP_CLIENT_CERT")
        env.delenv("MODELSEAL_HTTP_CLIENT_KEY")
        behaviour.requests.clear()
        # aiohttp's server hangs up without an alert: TLS 1.2 inside the handshake (not retried), TLS 1.3 after it
        # (it checks the client's certificate then): either way the message names the likely cause
        want = r"client certificate \(mTLS\), set \$MODELSEAL_HTTP_CLIENT_CERT"
        with pytest.raises(UsageError, match=want) as e:
            modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host)
        assert "\n" not in str(e.value)
        assert behaviour.requests == []  # nothing was served


def test_an_untrusted_server_certificate_is_one_line(site: Path, pki: Pki, host: HpkeIdentity,
                                                     env: pytest.MonkeyPatch) -> None:  # fmt: skip
    with range_server(site, Behaviour(token=TOKEN), tls=pki.server_context(False)) as (url, behaviour):
        env.setenv("MODELSEAL_HTTP_CA_BUNDLE", str(pki.rogue_ca))  # trusts another CA only
        env.setenv("MODELSEAL_HTTP_TOKEN_HOSTS", host_port(url))
        env.setenv("MODELSEAL_HTTP_BEARER_TOKEN", TOKEN)
        with pytest.raises(UsageError, match=r"TLS certificate is not trusted.*MODELSEAL_HTTP_CA_BUNDLE") as e:
            modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host)
        assert "\n" not in str(e.value) and "retries" not in str(e.value)
        assert behaviour.auth_seen == []  # the token was never sent: the handshake failed first
        env.setenv("MODELSEAL_HTTP_CA_BUNDLE", str(pki.ca))  # the right CA, but a name the certificate lacks
        with pytest.raises(UsageError, match="TLS certificate does not name this host"):
            modelseal.numpy.load_file(url.replace("127.0.0.1", "localhost") + "w.sealed.safetensors", identity=host)
        assert behaviour.auth_seen == []


def test_https_through_a_connect_proxy(site: Path, pki: Pki, host: HpkeIdentity, env: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:  # fmt: skip
    """$HTTPS_PROXY: a CONNECT tunnel through proxy.py (a real proxy), with its credentials. The server's
    certificate is still checked against the target's name, so the proxy cannot stand in for the server, and
    the bearer token only ever travels inside the tunnel."""
    log = tmp_path / "proxy.log"
    with range_server(site, Behaviour(token=TOKEN), tls=pki.server_context(False)) as (url, behaviour), \
            forward_proxy("bob:pw", log) as proxy:  # fmt: skip
        env.setenv("MODELSEAL_HTTP_TOKEN_HOSTS", host_port(url))
        env.setenv("MODELSEAL_HTTP_BEARER_TOKEN", TOKEN)
        env.setenv("https_proxy", proxy.replace("//", "//bob:pw@"))
        same(modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host))
        assert set(behaviour.auth_seen) == {f"Bearer {TOKEN}"}
        assert went_through(log, f"CONNECT {host_port(url)}")
        assert TOKEN not in log.read_text()
        env.setenv("MODELSEAL_HTTP_CA_BUNDLE", str(pki.rogue_ca))
        with pytest.raises(UsageError, match="TLS certificate is not trusted"):
            modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host)
        env.setenv("MODELSEAL_HTTP_CA_BUNDLE", str(pki.ca))
        env.setenv("https_proxy", proxy.replace("//", "//bob:nope@"))
        with pytest.raises(UsageError, match=r"the proxy wants credentials \(HTTP 407\)") as e:
            modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host)
        assert "nope" not in str(e.value) and "retries" not in str(e.value)


def test_a_damaged_tls_record_mid_body_is_retried(pki: Pki, env: pytest.MonkeyPatch) -> None:
    """Review of the http.client reader (L1): every TLS error was taken for a refused handshake, so one bad
    record in the middle of an answer (a flaky middlebox, one injected packet) failed the load for good. Only
    the handshake, and a certificate refusal, are final; this is retried and the load completes."""
    import socket

    from modelseal.load.remote.config import settings
    from modelseal.load.remote.http import RangeReader

    answers: list[int] = []

    def answer(conn: socket.socket, head: bytes, n: int) -> bool:
        answers.append(n)
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99/100\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 10)  # fmt: skip
        if len(answers) == 1:  # an application-data record that does not authenticate, under the TLS layer
            socket.socket.send(conn, b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            time.sleep(0.5)
            return False
        conn.sendall(b"x" * 90)
        return True

    with scripted_server(answer, tls=pki.server_context(False)) as url:
        got = bytearray(100)
        RangeReader(lambda: url + "x", url + "x", settings()).read_parts(0, [memoryview(got)])
    assert bytes(got) == b"x" * 100 and len(answers) == 2
