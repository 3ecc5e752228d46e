"""Certificate checks the verifiers share: every byte of a certificate accounted for, validity at a given
time, and a chain that ends at one pinned root.

The vendors' roots (AMD's ARKs, NVIDIA's device-identity and RIM roots) are pinned by their exact DER, not
trusted through any system store, and every time check takes the verification time as an argument: a key
service checks at the wall clock, a test or ``modelseal attest verify --at`` at a fixed time.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from modelseal.attest.base import EvidenceError
from modelseal.errors import UsageError

MAX_CHAIN = 8
MAX_CERTIFICATE = 8 * 1024  # NVIDIA's, AMD's and Intel's are 0.5-2 KiB
# what cryptography raises on a damaged certificate's lazily parsed fields (extensions, names, keys)
MALFORMED = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,  # a damaged version field: raised while loading, and not a ValueError
)
MAX_PEM = 64 * 1024


def der_element(data: bytes, pos: int) -> tuple[int, int]:
    """(start of contents, end) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    length, head = data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        length, head = int.from_bytes(data[head : head + count], "big"), head + count
    if head + length > len(data):
        raise ValueError("truncated DER")
    return head, head + length


def check_unsigned_fields(cert: x509.Certificate, what: str) -> None:
    """Two parts of a certificate are outside its signature: the outer signatureAlgorithm, which RFC 5280
    (4.1.1.2) says must equal the signed one in the TBSCertificate, and the signature BIT STRING's
    unused-bits count, which must be 0. Checking both means no byte of a chain goes unchecked."""
    der = cert.public_bytes(serialization.Encoding.DER)
    _, tbs_end = der_element(der, der_element(der, 0)[0])
    outer_end = der_element(der, tbs_end)[1]
    outer = der[tbs_end:outer_end]
    if der[der_element(der, outer_end)[0]] != 0:
        raise EvidenceError(f"the {what} certificate's signature BIT STRING has unused bits")
    tbs = cert.tbs_certificate_bytes
    pos = der_element(tbs, 0)[0]
    if tbs[pos] == 0xA0:  # [0] version
        pos = der_element(tbs, pos)[1]
    pos = der_element(tbs, pos)[1]  # serialNumber
    if tbs[pos : der_element(tbs, pos)[1]] != outer:
        raise EvidenceError(f"the {what} certificate's outer signature algorithm differs from the signed one")


def check_valid_at(cert: x509.Certificate, now: int, what: str) -> None:
    t = datetime.fromtimestamp(now, UTC)
    if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
        raise EvidenceError(
            f"the {what} certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}"
        )


def load_pem_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    """The certificates of a PEM chain, leaf first; a clear error for anything else."""
    if len(pem) > MAX_PEM:
        raise EvidenceError(f"the {what} is {len(pem)} bytes, more than {MAX_PEM}")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise EvidenceError(f"the {what} is not a PEM certificate chain: {exc}") from None
    if len(certs) > MAX_CHAIN:
        raise EvidenceError(f"the {what} has {len(certs)} certificates, more than {MAX_CHAIN}")
    for position, cert in enumerate(certs):
        if len(cert.public_bytes(serialization.Encoding.DER)) > MAX_CERTIFICATE:
            raise EvidenceError(f"the {what}'s certificate {position} is larger than {MAX_CERTIFICATE} bytes")
    return certs


_LINKS: OrderedDict[bytes, None] = OrderedDict()  # SHA-256 of (certificate, issuer) DERs proven linked
_LINKS_LOCK = threading.Lock()
MAX_LINKS = 4096


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None if ``issuer`` signed ``cert``, else why not. Proven links are remembered by a hash of the two
    DERs (a signature check is a pure function of them): every GPU of a model shares its chain's upper
    links and a renewing host presents the same leaf, so a key service checks each link's signature once
    (~1.4 ms, ECDSA P-384). Only successes are kept, by a 32-byte digest, at most 4096: evidence a host
    sends cannot grow the cache with its own bytes. Validity times are checked on every use."""
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    issuer_der = issuer.public_bytes(serialization.Encoding.DER)
    key = hashlib.sha256(len(cert_der).to_bytes(4, "big") + cert_der + issuer_der).digest()
    with _LINKS_LOCK:
        if key in _LINKS:
            _LINKS.move_to_end(key)
            return None
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return "has a signature that does not verify"
    except MALFORMED:  # issuer name mismatch, unusable key or algorithm, damaged fields
        return "was not issued by the next certificate in the chain"
    with _LINKS_LOCK:
        _LINKS[key] = None
        while len(_LINKS) > MAX_LINKS:
            _LINKS.popitem(last=False)
    return None


def load_root(pem: bytes, what: str) -> x509.Certificate:
    """A pinned root certificate, every field parsed now (cryptography parses lazily), so a damaged root
    stops the service at start-up instead of failing on the first evidence."""
    try:
        root = x509.load_pem_x509_certificate(pem)
        root.subject.rfc4514_string(), root.issuer.rfc4514_string(), root.public_key(), list(root.extensions)
        check_unsigned_fields(root, what)
        if issued_by(root, root):
            raise ValueError("it does not sign itself")
    except (*MALFORMED, EvidenceError) as exc:
        raise UsageError(f"the {what} is not a usable root certificate: {exc}") from None
    return root


def _name(cert: x509.Certificate, position: int) -> str:
    try:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        label = str(common[0].value) if common else cert.subject.rfc4514_string()
    except MALFORMED:
        label = "?"
    return f"certificate {position} ({label[:80]})"


def check_issuer(cert: x509.Certificate, below: int, label: str) -> None:
    """``cert`` (named ``label`` in messages) may sign certificates, with ``below`` CA certificates under it
    in the chain: a CA by basic constraints, within its path length, and allowed to by its key usage."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise EvidenceError(f"{label} issues a certificate but is not a CA")
    if constraints.path_length is not None and below > constraints.path_length:
        raise EvidenceError(f"{label} allows {constraints.path_length} CAs below it, the chain has {below}")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise EvidenceError(f"{label} may not sign certificates (key usage)")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(chain: list[x509.Certificate], root: x509.Certificate, now: int, what: str) -> None:
    """``chain`` (leaf first) ends at exactly ``root``, each certificate signed by the next, every issuer a
    CA, and all valid at ``now``. Anything malformed is an :class:`EvidenceError` naming the certificate."""
    if not chain:
        raise EvidenceError(f"the {what} is empty")
    if chain[-1].public_bytes(serialization.Encoding.DER) != root.public_bytes(serialization.Encoding.DER):
        raise EvidenceError(f"the {what} does not end at the pinned root ({root.subject.rfc4514_string()})")
    try:
        for position, cert in enumerate(chain):
            label = f"{what}'s {_name(cert, position)}"
            check_unsigned_fields(cert, label)
            check_valid_at(cert, now, label)
            issuer = chain[min(position + 1, len(chain) - 1)]  # the root signs itself
            if position > 0:
                check_issuer(cert, position - 1, f"the {label}")
            elif _is_ca(cert):
                raise EvidenceError(f"the {label} is a CA certificate, not an end entity")
            problem = issued_by(cert, issuer)
            if problem:
                raise EvidenceError(f"the {label} {problem}")
    except MALFORMED as exc:  # lazily parsed fields of a damaged certificate
        raise EvidenceError(f"a certificate in the {what} is malformed: {exc}") from None
