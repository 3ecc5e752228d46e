"""Certificate revocation from OCSP responses the host brings (RFC 6960), checked offline at a given time.

A key service often cannot reach a vendor's OCSP responder (NVIDIA's, for GPU certificates), and a check
made by the host proves nothing. What the host *can* carry is the responder's signed answer: this module
verifies it as collateral, like Intel's CRLs in a DCAP quote. For each certificate of a chain below its
root it needs one response that

- is ``SUCCESSFUL`` and names this certificate (serial number, issuer name hash and issuer key hash, in
  the hash the response uses);
- is signed by the certificate's issuer, or by a responder certificate the issuer signed for OCSP signing
  (extended key usage ``OCSPSigning``) that is valid at the verification time, and names that signer in its
  responder id;
- is fresh: ``thisUpdate <= now <= nextUpdate`` (a response without ``nextUpdate`` cannot be judged fresh
  and is refused);
- says ``GOOD``. ``REVOKED`` is refused with the revocation time and reason, ``UNKNOWN`` as such.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp

from modelseal.attest.base import EvidenceError
from modelseal.attest.certchain import MALFORMED, check_valid_at, der_element, issued_by

MAX_RESPONSE = 16 * 1024


def load_responses(ders: list[bytes], what: str) -> list[ocsp.OCSPResponse]:
    responses = []
    for position, der in enumerate(ders):
        if len(der) > MAX_RESPONSE:
            raise EvidenceError(f"{what} OCSP response {position} is {len(der)} bytes, more than {MAX_RESPONSE}")
        try:
            responses.append(ocsp.load_der_ocsp_response(der))
        except ValueError as exc:
            raise EvidenceError(f"{what} OCSP response {position} is malformed: {exc}") from None
    return responses


def _key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING's value (after its unused-bits byte): what issuerKeyHash hashes."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    start = der_element(spki, 0)[0]
    bits_start, bits_end = der_element(spki, der_element(spki, start)[1])
    return spki[bits_start + 1 : bits_end]


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(algorithm.name, data).digest()


def _names(single: ocsp.OCSPSingleResponse, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    algorithm = single.hash_algorithm
    return (
        single.serial_number == cert.serial_number
        and single.issuer_name_hash == _digest(algorithm, issuer.subject.public_bytes())
        and single.issuer_key_hash == _digest(algorithm, _key_bits(issuer))
    )


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: int, what: str) -> x509.Certificate:
    """The issuer, or a delegated responder the issuer certified for OCSP signing."""
    signer = issuer
    if response.certificates:
        delegate = response.certificates[0]
        if delegate.public_bytes(serialization.Encoding.DER) != issuer.public_bytes(serialization.Encoding.DER):
            if issued_by(delegate, issuer):
                raise EvidenceError(f"{what}: the OCSP responder's certificate was not issued by the CA it answers for")
            try:
                usage = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                usage = x509.ExtendedKeyUsage([])
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
                raise EvidenceError(f"{what}: the OCSP responder's certificate is not for OCSP signing")
            check_valid_at(delegate, now, f"{what} OCSP responder")
            signer = delegate
    if response.responder_key_hash is not None:
        # RFC 6960 fixes ResponderID's KeyHash as SHA-1 of the key: an identifier, not a security check
        named = response.responder_key_hash == hashlib.sha1(_key_bits(signer)).digest()  # noqa: S324
    else:
        named = response.responder_name == signer.subject
    if not named:
        raise EvidenceError(f"{what}: the OCSP response's responder id does not name its signer")
    return signer


def _check_signature(response: ocsp.OCSPResponse, signer: x509.Certificate, what: str) -> None:
    key, algorithm = signer.public_key(), response.signature_hash_algorithm
    if algorithm is None:
        raise EvidenceError(f"{what}: the OCSP response's signature algorithm is not supported")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        else:
            raise EvidenceError(f"{what}: the OCSP responder's key type is not supported")
    except InvalidSignature:
        raise EvidenceError(f"{what}: the OCSP response's signature does not verify") from None


def check_revocation(
    cert: x509.Certificate, issuer: x509.Certificate, responses: list[ocsp.OCSPResponse], now: int, what: str
) -> None:
    """``cert`` is not revoked, by a fresh response in ``responses`` that its issuer's responder signed."""
    at = datetime.fromtimestamp(now, UTC)
    try:
        for response in responses:
            if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                continue
            matching = [single for single in response.responses if _names(single, cert, issuer)]
            if not matching:
                continue
            _check_signature(response, _signer(response, issuer, now, what), what)
            single = matching[0]
            if single.next_update_utc is None:
                raise EvidenceError(f"{what}: the OCSP response has no nextUpdate, so its freshness is unknown")
            if not single.this_update_utc <= at <= single.next_update_utc:
                raise EvidenceError(
                    f"{what}: the OCSP response is for {single.this_update_utc:%Y-%m-%d %H:%M} to "
                    f"{single.next_update_utc:%Y-%m-%d %H:%M}, not the verification time"
                )
            status = single.certificate_status
            if status == ocsp.OCSPCertStatus.REVOKED:
                reason = single.revocation_reason.name if single.revocation_reason else "unspecified"
                when = single.revocation_time_utc
                raise EvidenceError(f"{what} was revoked ({reason})" + (f" on {when:%Y-%m-%d}" if when else ""))
            if status != ocsp.OCSPCertStatus.GOOD:
                raise EvidenceError(f"{what}: the OCSP responder does not know the certificate")
            return
    except MALFORMED as exc:  # lazily parsed fields of a damaged response or certificate
        raise EvidenceError(f"{what}: an OCSP response is malformed: {exc}") from None
    raise EvidenceError(f"{what}: no OCSP response for it was presented (serial {cert.serial_number:x})")


def check_chain_revocation(chain: list[x509.Certificate], ders: list[bytes], now: int, what: str) -> None:
    """Every certificate of ``chain`` (leaf first, root last) below the root has a good, fresh response."""
    responses = load_responses(ders, what)
    for position in range(len(chain) - 1):
        check_revocation(chain[position], chain[position + 1], responses, now, f"{what}'s certificate {position}")


def request_for(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """The DER OCSP request for ``cert`` (SHA-384 ids, as NVIDIA's verifier sends), for a host to fetch."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA384())
    return builder.build().public_bytes(serialization.Encoding.DER)
