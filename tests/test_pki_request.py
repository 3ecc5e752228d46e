"""A host's key need not leave the host: `pki request` makes the key and a signing request there, and
`pki issue --csr` certifies that key with the names the CA's owner chooses. The request crosses a trust
boundary, so a forged, oversized, foreign or weak one is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from modelseal import pki
from modelseal.cli.main import main
from modelseal.errors import KeyFileError


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_the_host_keeps_its_key_and_the_owner_sets_the_names(tmp_path: Path) -> None:
    ca, host = tmp_path / "ca", tmp_path / "host"
    assert invoke("pki", "init", str(ca))[0] == 0
    code, out = invoke("pki", "request", str(host), "host-a")
    assert code == 0 and "stays here" in out
    assert (host / "host-a.key").stat().st_mode & 0o777 == 0o600
    code, out = invoke("pki", "issue", str(ca), "host-a", "--csr", str(host / "host-a.csr"), "--uri", "spiffe://t/a")
    assert code == 0 and "key:" not in out and not (ca / "host-a.key").exists()  # no key made at the CA
    cert = x509.load_pem_x509_certificate((ca / "host-a.pem").read_bytes())
    key = serialization.load_pem_private_key((host / "host-a.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # type: ignore[union-attr]
    ident = pki.identity_of_cert_file(ca / "host-a.pem")
    assert ident.uris == ("spiffe://t/a",)
    # the certificate and the host's own key make a working TLS client identity
    pki.client_context(str(ca / "ca.pem"), str(ca / "host-a.pem"), str(host / "host-a.key"))


def csr_for(key: object, *, uri: str | None = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "evil")])
    )
    if uri:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def test_names_in_the_request_are_ignored(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    path = tmp_path / "x.csr"
    path.write_bytes(csr_for(ec.generate_private_key(ec.SECP256R1()), uri="spiffe://t/admin").public_bytes(
        serialization.Encoding.PEM))  # fmt: skip
    cert = pki.sign_request(tmp_path / "ca", "host-b", path, uris=["spiffe://t/b"])
    assert pki.identity_of_cert_file(cert).uris == ("spiffe://t/b",)  # not the requested spiffe://t/admin


def test_a_forged_oversized_foreign_or_weak_request_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    good = csr_for(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.DER)
    forged = bytearray(good)
    forged[-10] ^= 1  # inside the signature
    cases = {
        "forged.csr": (bytes(forged), "does not verify"),
        "big.csr": (b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 70_000, "over 64 KiB"),
        "cert.pem": ((tmp_path / "ca" / "ca.pem").read_bytes(), "not a certificate signing request"),
        "weak.csr": (csr_for(rsa.generate_private_key(65537, 1024)).public_bytes(serialization.Encoding.PEM),
                     "EC P-256/P-384 or RSA of at least 2048 bits"),
    }
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KeyFileError, match=why):
            pki.sign_request(tmp_path / "ca", "h", tmp_path / name)
        assert not (tmp_path / "ca" / "h.pem").exists()
    code, out = invoke("pki", "issue", str(tmp_path / "ca"), "h", "--csr", str(tmp_path / "forged.csr"))
    assert code == 1 and out.count("\n") == 1 and "does not verify" in out
