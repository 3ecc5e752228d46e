"""NVIDIA Reference Integrity Manifests (RIMs): the signed golden measurements of a GPU's driver and VBIOS.

A RIM is a TCG RIM / ISO 19770-2 SWID tag (``SoftwareIdentity``) whose ``Payload`` lists one ``Resource``
per SPDM measurement index, signed with an enveloped XML-DSig signature (ECDSA P-384/SHA-384, C14N 1.1,
``Reference URI=""``) whose ``KeyInfo/X509Data`` carries the signing chain: *HCC RIM L4 Signer* ->
*NVIDIA Reference Value L3 GH100 001* -> *NVIDIA Reference Value GH100 CA* -> *NVIDIA CoRIM signing Root CA*
(the root NVIDIA's verifier pins as ``verifier_RIM_root.pem``).

:func:`verify_rim` accepts a RIM only when all of this holds, and raises
:class:`~modelseal.attest.base.EvidenceError` naming the RIM (``what``) and the reason otherwise:

* the bytes are at most :data:`MAX_RIM_BYTES`, UTF-8, carry no DTD or entity declaration at all (so no
  entity expansion or external entity can be asked for), and parse with a parser that resolves no
  entities, loads no DTD and touches no network, to a tree at most :data:`MAX_DEPTH` deep;
* the root is ``SoftwareIdentity`` with exactly one ``ds:Signature``, a direct child of it;
* the first ``X509Certificate`` (the signer) chains, through the other certificates in ``KeyInfo``, to
  exactly the pinned root (DER equality): each link's signature verifies with its issuer's key, every
  issuer is a CA allowed to sign certificates (and within its path length), the signer is not a CA and may
  sign (digitalSignature), and every certificate, the root included, is valid at ``at``;
* signxml verifies the XML signature with that signer's key, at ``at``, allowing only ECDSA/RSA with
  SHA-2 and one reference, which must be ``URI=""`` (the whole document less the signature);
* the golden measurements are read **only from the element signxml returns as signed** (its canonical
  re-parse), never from our own parse of the input, so content outside the signature (a second
  ``Payload``, a wrapped document: XML signature wrapping) can never be read as measurements;
* that signed payload is one ``Payload`` of ``Resource type="Measurement"`` entries, each with a decimal
  ``index`` 0..253 (SPDM block index - 1) met once, ``active`` ``True``/``False``, ``size`` 1..64 bytes, and
  ``alternatives`` = N hashes ``Hash0``..``HashN-1`` (xmlenc#sha384 namespace), each exactly ``size``
  bytes of hex, and no other hash attribute.

Why the certificate chain is checked here and not by signxml: signxml 5 hands chain building to
``cryptography.x509.verification``, whose Web PKI profile refuses NVIDIA's intermediate certificates
(their validity dates before 2050 are GeneralizedTime, which RFC 5280 forbids), and its ``ca_pem_file``
takes only a file name. So the chain is walked with ``cryptography`` primitives against the one pinned
root at the caller's fixed time, and signxml is given the signer certificate (``x509_cert``) to check the
XML-DSig references and signature, where it is the maintained implementation.

What this does not do: revocation (NVIDIA publishes OCSP for these certificates; nothing here can reach
it), and matching the RIM to a report, which the ``nvidia-gpu`` verifier does; :func:`golden_measurements`
merges a driver and a VBIOS RIM the way NVIDIA's verifier does. Production and ``test_no_gpu`` VBIOS RIMs of
one version are signed by the same chain and say the same version: only their measurements tell them apart,
so which one applies is decided by matching the report, never here.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from modelseal.attest.base import EvidenceError
from modelseal.attest.certchain import MALFORMED, MAX_CERTIFICATE, check_issuer, issued_by
from modelseal.errors import MissingDependencyError, one_line

MAX_RIM_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_CERTS = 8
MAX_MEASUREMENTS = 254
MAX_ALTERNATIVES = 64
MAX_INDEX = 253  # SPDM measurement blocks are numbered 1..254; a RIM's index is the block number less one

SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
TCG = "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"
DS = "http://www.w3.org/2000/09/xmldsig#"
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"

_DECIMAL = re.compile(r"[0-9]{1,3}")
_HEX = re.compile(r"[0-9a-fA-F]*")
_HASH_NAME = re.compile(r"Hash(0|[1-9][0-9]{0,2})")
_CERT_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclass(frozen=True)
class RimMeasurement:
    """One golden measurement: the SPDM block ``index + 1`` must equal one of ``alternatives`` when
    ``active``; an inactive one is not compared."""

    index: int
    name: str
    active: bool
    size: int
    alternatives: tuple[bytes, ...]


@dataclass(frozen=True)
class Rim:
    """What a verified RIM's signature covers, plus who signed it (``signer``: the leaf certificate's
    subject; ``signer_sha256``: its DER's SHA-256) and until when its chain is valid (``not_after``: the
    earliest ``notAfter`` in the chain, as NVIDIA's verifier reports)."""

    tag_id: str
    name: str  # SoftwareIdentity/@name, such as "GH100"
    product: str  # Meta/@product
    version: str  # SoftwareIdentity/@version (the tag's, such as "1.0")
    colloquial_version: str  # Meta/@colloquialVersion: the driver ("545.00") or VBIOS ("96.00.5E.00.01") version
    manufacturer: str  # Meta/@tcg:FirmwareManufacturer
    manufacturer_id: str  # Meta/@tcg:FirmwareManufacturerId (NVIDIA: 5703)
    measurements: dict[int, RimMeasurement] = field(hash=False)
    signer: str
    signer_sha256: str
    not_before: datetime  # the latest notBefore in the chain: the RIM verifies from then ...
    not_after: datetime  # ... to the earliest notAfter


def _xml_libraries() -> tuple[ModuleType, ModuleType]:
    """lxml and signxml, which only the key service needs (``modelseal[keyserver]``)."""
    try:
        import signxml
        from lxml import etree
    except ImportError:
        raise MissingDependencyError(
            "checking NVIDIA RIMs needs signxml and lxml: pip install 'modelseal[keyserver]'"
        ) from None
    return etree, signxml


def verify_rim(xml: bytes, *, root: x509.Certificate, at: datetime, what: str) -> Rim:
    """Verify one RIM (``what`` names it in errors: "driver RIM", "VBIOS RIM") against the pinned RIM
    signing ``root`` at time ``at`` (timezone-aware) and return what its signature covers."""
    if at.tzinfo is None:
        raise ValueError("verify_rim needs a timezone-aware time")
    at = at.astimezone(UTC)
    etree, signxml = _xml_libraries()
    doc = _parse(etree, xml, what)
    signature = _signature(doc, what)
    try:
        chain = _chain(_certificates(signature, what), root, at, what)
    except EvidenceError:
        raise
    except Exception as exc:  # cryptography parses certificates lazily: any of its errors on a broken one refuses
        raise EvidenceError(f"{what}: a certificate in the signature is malformed ({one_line(exc)})") from None
    signed = _signed_payload(etree, signxml, doc, chain[0], at, what)
    return _read_rim(signed, chain, what)


def golden_measurements(driver: Rim, vbios: Rim) -> dict[int, tuple[bytes, ...]]:
    """The active golden measurements of a driver and a VBIOS RIM by index, as NVIDIA's verifier merges
    them: inactive entries drop out, and an index active in both RIMs is refused. A RIM with nothing
    active would check nothing: refused too (NVIDIA's verifier lets it pass; none of NVIDIA's RIMs is so)."""
    golden: dict[int, tuple[bytes, ...]] = {}
    for rim, what in ((driver, "driver RIM"), (vbios, "VBIOS RIM")):
        if not any(m.active for m in rim.measurements.values()):
            raise EvidenceError(f"the {what} ({rim.colloquial_version}) has no active measurement to check")
        for index, m in sorted(rim.measurements.items()):
            if not m.active:
                continue
            if index in golden:
                raise EvidenceError(f"the driver RIM and the VBIOS RIM both set measurement index {index} active")
            golden[index] = m.alternatives
    return golden


# --- parsing -------------------------------------------------------------------------------------------


def _parse(etree: ModuleType, xml: bytes, what: str) -> Any:
    if not isinstance(xml, bytes | bytearray):
        raise EvidenceError(f"{what}: expected the RIM's bytes, got {type(xml).__name__}")
    if len(xml) > MAX_RIM_BYTES:
        raise EvidenceError(f"{what}: {len(xml)} bytes is over the {MAX_RIM_BYTES}-byte limit for a RIM")
    try:
        text = bytes(xml).decode("utf-8")
    except UnicodeDecodeError:
        raise EvidenceError(f"{what}: not UTF-8 text, so not a RIM") from None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise EvidenceError(f"{what}: has a DTD or entity declaration, which a RIM never needs")
    parser = _parser(etree)
    try:
        doc = etree.fromstring(bytes(xml), parser)
    except etree.XMLSyntaxError as exc:
        raise EvidenceError(f"{what}: not well-formed XML ({one_line(exc)})") from None
    if doc is None:
        raise EvidenceError(f"{what}: empty document")
    depth = 0
    for event, _ in etree.iterwalk(doc, events=("start", "end")):
        depth += 1 if event == "start" else -1
        if depth > MAX_DEPTH:
            raise EvidenceError(f"{what}: elements nested deeper than {MAX_DEPTH}")
    if doc.tag != f"{{{SWID}}}SoftwareIdentity":
        raise EvidenceError(f"{what}: the root element is {_local(doc.tag)!r}, not a SWID SoftwareIdentity")
    return doc


def _parser(etree: ModuleType) -> Any:
    """No entities, no DTD, no network, libxml2's own size and depth limits kept (no huge_tree)."""
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False
    )


def _local(tag: object) -> str:
    return str(tag).rpartition("}")[2] if isinstance(tag, str) else type(tag).__name__


def _signature(doc: Any, what: str) -> Any:
    everywhere = list(doc.iter(f"{{{DS}}}Signature"))
    children = doc.findall(f"{{{DS}}}Signature")
    if len(everywhere) != 1 or len(children) != 1:
        raise EvidenceError(f"{what}: needs exactly one XML signature, enveloped in SoftwareIdentity; it has "
                            f"{len(everywhere)} ({len(children)} at the top)")
    return children[0]


def _certificates(signature: Any, what: str) -> list[x509.Certificate]:
    nodes = signature.findall(f"{{{DS}}}KeyInfo/{{{DS}}}X509Data/{{{DS}}}X509Certificate")
    if not nodes:
        raise EvidenceError(f"{what}: the signature carries no X509Certificate")
    if len(nodes) > MAX_CERTS:
        raise EvidenceError(f"{what}: the signature carries {len(nodes)} certificates, more than {MAX_CERTS}")
    certs = []
    for n, node in enumerate(nodes):
        try:
            der = base64.b64decode("".join((node.text or "").split()), validate=True)
            if len(der) > MAX_CERTIFICATE:
                raise ValueError(f"{len(der)} bytes, more than {MAX_CERTIFICATE}")
            certs.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError, x509.InvalidVersion) as exc:
            raise EvidenceError(f"{what}: certificate {n} in the signature is malformed ({one_line(exc)})") from None
    return certs


# --- the certificate chain -----------------------------------------------------------------------------


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType], what: str) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except Exception as exc:  # DuplicateExtension, or a malformed extension (ValueError)
        raise EvidenceError(f"{what}: certificate {_cn(cert)!r} has malformed extensions ({one_line(exc)})") from None


def _check_valid_at(cert: x509.Certificate, at: datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise EvidenceError(f"{what}: certificate {_cn(cert)!r} is not valid before "
                            f"{cert.not_valid_before_utc.isoformat()} (checked at {at.isoformat()})")
    if at > cert.not_valid_after_utc:
        raise EvidenceError(f"{what}: certificate {_cn(cert)!r} expired at "
                            f"{cert.not_valid_after_utc.isoformat()} (checked at {at.isoformat()})")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        if not isinstance(cert.signature_hash_algorithm, _CERT_HASHES):
            return False
    except Exception:  # an unknown algorithm (UnsupportedAlgorithm) in a damaged certificate
        return False
    return issued_by(cert, issuer) is None


def _check_issuer(issuer: x509.Certificate, below: int, what: str) -> None:
    try:
        check_issuer(issuer, below, f"{what}: certificate {_cn(issuer)!r}")
    except MALFORMED as exc:  # DuplicateExtension, or a malformed extension (ValueError)
        raise EvidenceError(f"{what}: certificate {_cn(issuer)!r} has malformed extensions ({one_line(exc)})") from None


def _chain(certs: list[x509.Certificate], root: x509.Certificate, at: datetime, what: str) -> list[x509.Certificate]:
    """The signer (the first certificate) up to the pinned root, every link checked; the root is matched
    by its exact DER, so only it can end the chain."""
    root_der = root.public_bytes(serialization.Encoding.DER)
    signer = certs[0]
    if signer.public_bytes(serialization.Encoding.DER) == root_der:
        raise EvidenceError(f"{what}: signed by the root certificate itself, not by a RIM signing certificate")
    constraints = _extension(signer, x509.BasicConstraints, what)
    if constraints is not None and constraints.ca:
        raise EvidenceError(f"{what}: the signing certificate {_cn(signer)!r} is a CA certificate")
    usage = _extension(signer, x509.KeyUsage, what)
    if usage is None or not usage.digital_signature:
        raise EvidenceError(f"{what}: the signing certificate {_cn(signer)!r} may not sign (key usage)")
    chain = [signer]
    pool = [c for c in certs[1:] if c.public_bytes(serialization.Encoding.DER) != root_der]
    while True:
        current = chain[-1]
        if _signed_by(current, root):
            _check_issuer(root, len(chain) - 1, what)
            chain.append(root)
            break
        issuers = [c for c in pool if c not in chain and _signed_by(current, c)]
        if not issuers or len(chain) >= MAX_CERTS:
            raise EvidenceError(f"{what}: the signing certificate chain does not lead to the pinned NVIDIA RIM "
                                f"root (stops at {_cn(current)!r}, issued by "
                                f"{current.issuer.rfc4514_string()!r})")
        _check_issuer(issuers[0], len(chain) - 1, what)
        chain.append(issuers[0])
    for cert in chain:
        _check_valid_at(cert, at, what)
    return chain


# --- the XML signature ---------------------------------------------------------------------------------


def _signed_payload(etree: ModuleType, signxml: ModuleType, doc: Any, signer: x509.Certificate,
                    at: datetime, what: str) -> Any:
    """signxml's check of the references and the signature with ``signer``; returns the signed element."""
    from signxml.algorithms import DigestAlgorithm, SignatureMethod

    config = signxml.SignatureConfiguration(
        require_x509=True,
        location="./",
        expect_references=1,
        signature_methods=frozenset({
            SignatureMethod.ECDSA_SHA256, SignatureMethod.ECDSA_SHA384, SignatureMethod.ECDSA_SHA512,
            SignatureMethod.RSA_SHA256, SignatureMethod.RSA_SHA384, SignatureMethod.RSA_SHA512,
        }),
        digest_algorithms=frozenset({DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512}),
        verification_time=at,
    )
    try:
        result = signxml.XMLVerifier().verify(doc, x509_cert=signer, parser=_parser(etree), expect_config=config)
    except signxml.InvalidDigest:
        raise EvidenceError(f"{what}: the signed content was changed (digest mismatch)") from None
    except signxml.InvalidSignature as exc:
        raise EvidenceError(f"{what}: bad XML signature ({one_line(exc)})") from None
    except Exception as exc:  # anything signxml or lxml raises on malformed input refuses the RIM
        raise EvidenceError(f"{what}: the XML signature cannot be checked ({one_line(exc)})") from None
    references = result.signature_xml.findall(f"{{{DS}}}SignedInfo/{{{DS}}}Reference")
    if len(references) != 1 or references[0].get("URI") != "":
        raise EvidenceError(f"{what}: the signature must cover the whole document (one Reference URI=\"\")")
    signed = result.signed_xml
    if signed is None or signed.tag != f"{{{SWID}}}SoftwareIdentity":
        raise EvidenceError(f"{what}: the signed element is not the SoftwareIdentity")
    return signed


# --- the signed content --------------------------------------------------------------------------------


def _required(element: Any, name: str, what: str, where: str) -> str:
    value = element.get(name)
    if value is None or not value.strip():
        raise EvidenceError(f"{what}: {where} has no {_local(name)!r}")
    return str(value)


def _one(signed: Any, tag: str, what: str) -> Any:
    found = list(signed.iter(f"{{{SWID}}}{tag}"))
    direct = signed.findall(f"{{{SWID}}}{tag}")
    if len(found) != 1 or len(direct) != 1:
        raise EvidenceError(f"{what}: needs exactly one {tag} in SoftwareIdentity, has {len(found)}")
    return direct[0]


def _read_rim(signed: Any, chain: list[x509.Certificate], what: str) -> Rim:
    meta = _one(signed, "Meta", what)
    payload = _one(signed, "Payload", what)
    measurements: dict[int, RimMeasurement] = {}
    for resource in payload:
        if not isinstance(resource.tag, str):  # comments and processing instructions carry nothing
            continue
        m = _measurement(resource, what)
        if m.index in measurements:
            raise EvidenceError(f"{what}: measurement index {m.index} appears twice")
        measurements[m.index] = m
        if len(measurements) > MAX_MEASUREMENTS:
            raise EvidenceError(f"{what}: more than {MAX_MEASUREMENTS} measurements")
    if not measurements:
        raise EvidenceError(f"{what}: has no golden measurements")
    return Rim(
        tag_id=_required(signed, "tagId", what, "SoftwareIdentity"),
        name=_required(signed, "name", what, "SoftwareIdentity"),
        product=_required(meta, "product", what, "Meta"),
        version=_required(signed, "version", what, "SoftwareIdentity"),
        colloquial_version=_required(meta, "colloquialVersion", what, "Meta"),
        manufacturer=_required(meta, f"{{{TCG}}}FirmwareManufacturer", what, "Meta"),
        manufacturer_id=_required(meta, f"{{{TCG}}}FirmwareManufacturerId", what, "Meta"),
        measurements=measurements,
        signer=chain[0].subject.rfc4514_string(),
        signer_sha256=chain[0].fingerprint(hashes.SHA256()).hex(),
        not_before=max(c.not_valid_before_utc for c in chain),
        not_after=min(c.not_valid_after_utc for c in chain),
    )


def _decimal(resource: Any, name: str, what: str, where: str, low: int, high: int) -> int:
    raw = _required(resource, name, what, where)
    if not _DECIMAL.fullmatch(raw) or not low <= int(raw) <= high:
        raise EvidenceError(f"{what}: {where} has a malformed {name} {raw[:20]!r} (want {low}..{high})")
    return int(raw)


def _measurement(resource: Any, what: str) -> RimMeasurement:
    if resource.tag != f"{{{SWID}}}Resource":
        raise EvidenceError(f"{what}: Payload holds a {_local(resource.tag)!r}, not only Resource elements")
    raw_index = resource.get("index")
    where = f"measurement index {raw_index[:20] if raw_index is not None else '(none)'}"
    if resource.get("type") != "Measurement":
        raise EvidenceError(f"{what}: {where} is not of type Measurement")
    index = _decimal(resource, "index", what, where, 0, MAX_INDEX)
    active_raw = resource.get("active")
    if active_raw not in ("True", "False", "true", "false"):
        raise EvidenceError(f"{what}: {where} has active={str(active_raw)[:20]!r}, not True or False")
    active = active_raw in ("True", "true")
    size = _decimal(resource, "size", what, where, 1, 64)
    count = _decimal(resource, "alternatives", what, where, 1 if active else 0, MAX_ALTERNATIVES)
    name = _required(resource, "name", what, where)
    hashes_: dict[int, bytes] = {}
    for attribute, value in resource.attrib.items():
        namespace, _, local = str(attribute).rpartition("}")
        if not namespace:
            continue  # type, index, active, alternatives, size, name and any plain attribute NVIDIA adds
        if namespace != "{" + SHA384_NS or not (match := _HASH_NAME.fullmatch(local)):
            raise EvidenceError(f"{what}: {where} has an unexpected attribute {local!r} ({namespace[1:]})")
        k = int(match.group(1))
        if k >= count:
            raise EvidenceError(f"{what}: {where} has Hash{k} but alternatives={count}")
        if len(value) != 2 * size or not _HEX.fullmatch(value):
            raise EvidenceError(f"{what}: {where} Hash{k} is not {size} bytes of hex")
        hashes_[k] = bytes.fromhex(value)
    if len(hashes_) != count:
        raise EvidenceError(f"{what}: {where} has {len(hashes_)} hashes, alternatives says {count}")
    return RimMeasurement(index=index, name=name, active=active, size=size,
                          alternatives=tuple(hashes_[k] for k in range(count)))
