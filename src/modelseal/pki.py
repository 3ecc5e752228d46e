"""Certificates and TLS contexts for the key service, the agent and the server.

A first deployment needs a CA, a server certificate for the key service and one client certificate
per host; :func:`init_ca`, :func:`issue` do that with ECDSA P-256 keys (``modelseal pki``). Production
sites bring their own PKI; everything here only needs PEM files.

A host's identity is what its client certificate proves: the SHA-256 of its public key
(``spki:BASE64URL``, stable across re-issuance with the same key) and its URI SANs (SPIFFE-style
``spiffe://trust-domain/path``). The two are different types and never compared with each other: a URI
SAN must be a real URI in canonical form (:func:`identity_uri`), so no certificate can carry a URI that
reads like a key hash (``spki:...``) or that walks out of a prefix (``/prod/../host``). TLS 1.3 is the
minimum on both sides.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelseal import atomicfile
from modelseal.encoding import b64e
from modelseal.errors import KeyFileError, UsageError

CA_CERT, CA_KEY = "ca.pem", "ca.key"

# --- identity URIs ---------------------------------------------------------------------------------

SPKI_PREFIX = "spki:"  # the key-hash identity; no URI may use it as a scheme
MAX_IDENTITY_URI = 480
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_AUTHORITY = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?(?::[0-9]{1,5})?")
# No '%' (encoded dots and slashes), '?', '#', '@', '*', '\\', '[', ']', whitespace, controls or non-ASCII.
_DOTS = re.compile(r"\.+(?:;.*)?")  # '.', '..', and what some servers read as '..' ('...', '..;x')
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/+=,;!$&'()")
_WHY_NOT = {
    "%": "percent-encoding is not allowed (it can hide '.', '/' or NUL); write the characters themselves",
    "?": "a query is not allowed in an identity",
    "#": "a fragment is not allowed in an identity",
    "@": "user information ('@') is not allowed in an identity",
    "*": "'*' is not allowed in a URI (only a grant may end in /* to name a prefix)",
}


def identity_uri(text: str) -> str:
    """The canonical form of a URI that may name a host (a URI SAN, or what a grant names), or
    :class:`~modelseal.errors.UsageError` saying why it cannot be one.

    Grants match URIs by exact text or by a ``/*`` prefix, so every spelling that could make one URI
    look like another is refused rather than interpreted: the ``spki:`` scheme (the key-hash syntax),
    dot segments (``/prod/../host``, ``..;x``), empty segments and trailing slashes, percent-encoding, queries,
    fragments, user information, whitespace, control characters and non-ASCII. Scheme and host are
    case-insensitive (RFC 3986), so they are lowercased; the path is compared as written.
    """
    shown = ascii(text[:120]) if isinstance(text, str) else type(text).__name__

    def bad(why: str) -> UsageError:
        return UsageError(f"URI {shown} cannot be a host identity: {why}")

    if not isinstance(text, str) or not text:
        raise bad("it is empty")
    if len(text) > MAX_IDENTITY_URI:
        raise bad(f"it is longer than {MAX_IDENTITY_URI} characters")
    odd = next((c for c in text if c not in _ALLOWED), None)
    if odd is not None:
        raise bad(_WHY_NOT.get(odd) or f"character {odd!a} is not allowed (ASCII letters, digits, -._~:/+=,;!$&'())")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or not _SCHEME.fullmatch(scheme):
        raise bad("it has no URI scheme (write e.g. spiffe://trust-domain/path)")
    if scheme + ":" == SPKI_PREFIX:
        raise bad("'spki:' is the syntax of a key-hash identity; a URI SAN may never take that form")
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        authority = authority.lower()
        if not _AUTHORITY.fullmatch(authority):
            raise bad("the host must be letters, digits, '.', '-' or '_', with an optional :port")
        head, segments = f"{scheme}://{authority}", path.split("/") if slash else []
        path = slash + path
    elif rest and not rest.startswith("/"):
        head, path, segments = f"{scheme}:", rest, rest.split("/")
    else:
        raise bad("write scheme://host/path or scheme:name")
    if "" in segments:
        raise bad("empty path segments ('//' or a trailing '/') are not allowed")
    if any(_DOTS.fullmatch(seg) for seg in segments):
        raise bad("dot segments ('.', '..', '..;x') are not allowed")
    return head + path


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of an mTLS connection, as far as its certificate proves.

    ``uris`` holds the certificate's URI SANs in canonical form; ``refused_uris`` says why each URI SAN
    that cannot be an identity was left out. The key service serves no certificate with a refused URI.
    """

    spki: str  # "spki:" + base64url(SHA-256(SubjectPublicKeyInfo DER))
    spki_hash: bytes
    uris: tuple[str, ...] = field(default_factory=tuple)
    subject: str = ""
    refused_uris: tuple[str, ...] = field(default_factory=tuple)

    def names(self) -> tuple[str, ...]:
        """The key hash and the URIs, as the ``identity`` list of grant policies sees them."""
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
        raw = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        raw = []
    uris, refused = [], []
    for uri in raw:
        try:
            uris.append(identity_uri(uri))
        except UsageError as exc:
            refused.append(str(exc))
    return PeerIdentity(SPKI_PREFIX + b64e(digest), digest, tuple(uris), cert.subject.rfc4514_string(), tuple(refused))


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
    atomicfile.write_bytes(path, pem, atomicfile.PRIVATE, overwrite=force)


def _write_cert(path: Path, cert: x509.Certificate, force: bool) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    atomicfile.write_bytes(path, pem, atomicfile.default_mode(), overwrite=force)


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
    _write_cert(out / CA_CERT, cert, force)
    return out / CA_CERT


MAX_CSR = 64 * 1024  # a CSR is a few hundred bytes; anything near this is not one


def request(directory: str | os.PathLike[str], name: str, *, force: bool = False) -> tuple[Path, Path]:
    """On the host: a new key ``NAME.key`` (0600, never leaves the host) and a signing request ``NAME.csr``
    for the owner's CA (:func:`issue` with ``csr=``). The request carries only the public key and the
    name; the owner decides the names and URIs the certificate will hold."""
    out = Path(directory)
    _check_name(name)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    _write_key(out / f"{name}.key", key, force)
    atomicfile.write_bytes(out / f"{name}.csr", csr.public_bytes(serialization.Encoding.PEM),
                           atomicfile.default_mode(), overwrite=force)  # fmt: skip
    return out / f"{name}.csr", out / f"{name}.key"


def read_csr(path: str | os.PathLike[str]) -> Any:
    """The public key of the signing request at ``path``, once its self-signature checks (proof that the
    requester holds the key). It crosses a trust boundary: size-bounded, PEM or DER, EC P-256/P-384 or
    RSA of at least 2048 bits; its names are ignored (the signer sets them)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CSR + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CSR:
        raise KeyFileError(f"{path} is over {MAX_CSR // 1024} KiB: not a certificate signing request")
    try:
        csr = (x509.load_pem_x509_csr if data.lstrip().startswith(b"-----") else x509.load_der_x509_csr)(data)
    except ValueError:
        raise KeyFileError(f"{path} is not a certificate signing request (PEM or DER)") from None
    if not csr.is_signature_valid:
        raise KeyFileError(f"{path}: the request's signature does not verify (tampered, or not made with its key)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise KeyFileError(f"{path}: the request's key must be EC P-256/P-384 or RSA of at least 2048 bits")


def _check_name(name: str) -> None:
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"certificate name {name!r} may hold only letters, digits, '-', '_' and '.'")


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    server_names: list[str] | None = None,
    uris: list[str] | None = None,
    days: int = 825,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue ``NAME.pem`` / ``NAME.key`` signed by the CA in ``directory`` (the key is made here: for a
    first deployment; :func:`sign_request` certifies a key the host made and kept).

    ``server_names`` (DNS names or IP addresses) make it a server certificate; otherwise it is a client
    certificate whose ``uris`` (e.g. ``spiffe://example.org/host/a``) a grant can name; each must pass
    :func:`identity_uri` and is written in its canonical form.
    """
    out, key = Path(directory), ec.generate_private_key(ec.SECP256R1())
    cert = _certify(out, name, key.public_key(), server_names, uris, days)
    _write_key(out / f"{name}.key", key, force)
    _write_cert(out / f"{name}.pem", cert, force)
    return out / f"{name}.pem", out / f"{name}.key"


def sign_request(
    directory: str | os.PathLike[str],
    name: str,
    csr: str | os.PathLike[str],
    *,
    server_names: list[str] | None = None,
    uris: list[str] | None = None,
    days: int = 825,
    force: bool = False,
) -> Path:
    """Issue ``NAME.pem`` for the key in the host's signing request ``csr`` (:func:`request`): the key
    never leaves the host. Names and URIs come from the arguments, never from the request."""
    out = Path(directory)
    _write_cert(out / f"{name}.pem", _certify(out, name, read_csr(csr), server_names, uris, days), force)
    return out / f"{name}.pem"


def _certify(
    out: Path,
    name: str,
    public_key: Any,
    server_names: list[str] | None,
    uris: list[str] | None,
    days: int,
) -> x509.Certificate:
    """A certificate for ``public_key`` signed by the CA in ``out`` (checked and built, not written)."""
    _check_name(name)
    canonical = [identity_uri(u) for u in uris or []]
    try:
        ca_key = serialization.load_pem_private_key(_read(out / CA_KEY), None)
    except ValueError:
        raise KeyFileError(f"{out / CA_KEY} is not a PEM private key") from None
    ca_cert = x509.load_pem_x509_certificate(_read(out / CA_CERT))
    alt: list[x509.GeneralName] = []
    for n in server_names or []:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    alt += [x509.UniformResourceIdentifier(u) for u in canonical]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
