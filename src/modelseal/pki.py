"""Certificates and TLS contexts for the key service, the agent and the server.

A first deployment needs a CA, a server certificate for the key service and one client certificate
per host; :func:`init_ca`, :func:`issue` do that with ECDSA P-256 keys (``modelseal pki``). Production
sites bring their own PKI; everything here only needs PEM files.

A host's identity is what its client certificate proves: the SHA-256 of its public key
(``spki:BASE64URL``, stable across re-issuance with the same key) and its URI SANs (SPIFFE-style
``spiffe://trust-domain/path``). TLS 1.3 is the minimum on both sides.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelseal.encoding import b64e
from modelseal.errors import KeyFileError, UsageError

CA_CERT, CA_KEY = "ca.pem", "ca.key"


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of an mTLS connection, as far as its certificate proves."""

    spki: str  # "spki:" + base64url(SHA-256(SubjectPublicKeyInfo DER))
    spki_hash: bytes
    uris: tuple[str, ...] = field(default_factory=tuple)
    subject: str = ""

    def names(self) -> tuple[str, ...]:
        """Every identity string a grant may name for this peer."""
        return (self.spki, *self.uris)


def spki_hash(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def peer_identity(cert_der: bytes) -> PeerIdentity:
    """Extract the identity of a peer from its (already chain-verified) DER certificate."""
    cert = x509.load_der_x509_certificate(cert_der)
    digest = spki_hash(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return PeerIdentity("spki:" + b64e(digest), digest, uris, cert.subject.rfc4514_string())


def identity_of_cert_file(path: str | os.PathLike[str]) -> PeerIdentity:
    """The identity a grant should name for the host holding the certificate at ``path``."""
    cert = x509.load_pem_x509_certificate(_read(path))
    return peer_identity(cert.public_bytes(serialization.Encoding.DER))


# --- TLS contexts ---------------------------------------------------------------------------------


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str], client_ca: str | None) -> ssl.SSLContext:
    """TLS 1.3 server context; with ``client_ca``, client certificates are verified when presented.

    Client certificates are optional at the TLS layer so that the application can refuse a missing
    one with a clear HTTP error and an audit record, and so the admin API can use a bearer token.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(ctx, cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=os.fspath(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca: str | os.PathLike[str] | None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """TLS 1.3 client context verifying the server against ``ca`` (system roots if None)."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert or key:
        if not (cert and key):
            raise UsageError("a client certificate needs both --cert and --key")
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        raise KeyFileError(f"cannot load certificate {cert} with key {key}: {exc}") from None


# --- a small CA for first deployments --------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, force: bool) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; pass --force to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelseal"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def init_ca(
    directory: str | os.PathLike[str], name: str = "modelseal CA", days: int = 3650, force: bool = False
) -> Path:
    """Create ``ca.pem`` and ``ca.key`` (0600) in ``directory``; return the certificate path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(out / CA_KEY, key, force)
    (out / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / CA_CERT


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    server_names: list[str] | None = None,
    uris: list[str] | None = None,
    days: int = 825,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue ``NAME.pem`` / ``NAME.key`` signed by the CA in ``directory``.

    ``server_names`` (DNS names or IP addresses) make it a server certificate; otherwise it is a client
    certificate whose ``uris`` (e.g. ``spiffe://example.org/host/a``) a grant can name.
    """
    out = Path(directory)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"certificate name {name!r} may hold only letters, digits, '-', '_' and '.'")
    try:
        ca_key = serialization.load_pem_private_key(_read(out / CA_KEY), None)
    except ValueError:
        raise KeyFileError(f"{out / CA_KEY} is not a PEM private key") from None
    ca_cert = x509.load_pem_x509_certificate(_read(out / CA_CERT))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in server_names or []:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    alt += [x509.UniformResourceIdentifier(u) for u in uris or []]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    _write_key(out / f"{name}.key", key, force)
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.pem", out / f"{name}.key"
