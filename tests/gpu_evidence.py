"""NVIDIA GPU evidence made by the tests under their own roots (trusted only by the test that makes them).

The public samples carry their own fixed nonce and come from a GPU whose driver and VBIOS do not match the
sample RIMs, so a test that needs a report bound to *its* challenge, or measurements that match, makes one
here: a device root -> intermediate -> leaf chain (P-384, with the TCG DICE FWID extension the verifier
compares), an SPDM 1.1 GET_MEASUREMENTS request + MEASUREMENTS response signed by the leaf in the layout a
Hopper GPU uses, and driver/VBIOS RIMs signed with XML-DSig under a RIM root.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from modelseal.encoding import b64e

FWID_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
END = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")])


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
    start: dt.datetime = START,
    end: dt.datetime = END,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def pem(*certs: x509.Certificate) -> str:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs).decode()


@dataclass
class GpuUnderTestRoots:
    """A GPU of the test's making: its chain, its firmware id and the measurements it reports."""

    root: x509.Certificate
    chain: list[x509.Certificate]
    leaf_key: ec.EllipticCurvePrivateKey
    fwid: bytes
    measurements: dict[int, bytes] = field(default_factory=dict)
    issuer_keys: list[ec.EllipticCurvePrivateKey] = field(default_factory=list)  # chain[i]'s issuer's key
    driver_version: str = "570.86.15"
    vbios_version: bytes = bytes.fromhex("009f009601000000")  # 96.00.9F.00.01
    nvdec0: bytes = b"\xaa"

    @classmethod
    def make(cls, blocks: int = 64) -> GpuUnderTestRoots:
        root_key, ica_key, leaf_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
        root = certificate("Test Device Identity CA", root_key, None, ca=True)
        ica = certificate("Test GH100 Provisioner ICA", ica_key, (root.subject, root_key), ca=True)
        fwid = os.urandom(48)
        # the verifier compares the extension's last 48 bytes, where a Hopper leaf holds its FWID digest
        fwid_ext = x509.UnrecognizedExtension(FWID_OID, b"\x04\x30" + fwid)
        leaf = certificate(
            "GH100 A01 GSP FMC LF (test)", leaf_key, (ica.subject, ica_key), ca=False, extensions=(fwid_ext,)
        )
        measurements = {i: os.urandom(48) for i in range(1, blocks + 1)}
        return cls(root, [leaf, ica, root], leaf_key, fwid, measurements, [ica_key, root_key])

    def ocsp(
        self,
        position: int,
        status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
        *,
        this_update: dt.datetime = START,
        next_update: dt.datetime | None = END,
        signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> bytes:
        """The issuer's (or ``signer``'s) OCSP answer for certificate ``position`` of the chain, DER."""
        cert, issuer = self.chain[position], self.chain[position + 1]
        responder, key = signer or (issuer, self.issuer_keys[position])
        revoked = status == ocsp.OCSPCertStatus.REVOKED
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert, issuer=issuer, algorithm=hashes.SHA384(), cert_status=status,
            this_update=this_update, next_update=next_update,
            revocation_time=START if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, responder)  # fmt: skip
        if signer:
            builder = builder.certificates([responder])
        return builder.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)

    def sibling(self) -> GpuUnderTestRoots:
        """Another GPU of the same model: its own key and FWID, certified by the same CA, same firmware."""
        key, fwid = ec.generate_private_key(ec.SECP384R1()), os.urandom(48)
        ica = self.chain[1]
        leaf = certificate(
            "GH100 A01 GSP FMC LF (test)", key, (ica.subject, self.issuer_keys[0]), ca=False,
            extensions=(x509.UnrecognizedExtension(FWID_OID, b"\x04\x30" + fwid),),
        )  # fmt: skip
        return GpuUnderTestRoots(
            self.root, [leaf, *self.chain[1:]], key, fwid, dict(self.measurements), list(self.issuer_keys)
        )

    def opaque(self) -> bytes:
        fields = [
            (3, self.driver_version.encode() + b"\0"),
            (6, self.vbios_version),
            (11, self.nvdec0),
            (15, b"882\0"),
            (17, b"1010\0"),
            (18, b"0200\0"),
            (20, self.fwid),
        ]
        return b"".join(t.to_bytes(2, "little") + len(v).to_bytes(2, "little") + v for t, v in fields)

    def report(self, nonce: bytes, *, sign: bool = True) -> bytes:
        request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + b"\x00"
        record = b"".join(
            bytes([index, 0x01]) + (3 + len(value)).to_bytes(2, "little") + b"\x01" + len(value).to_bytes(2, "little")
            + value
            for index, value in sorted(self.measurements.items())
        )
        opaque = self.opaque()
        response = (
            bytes([0x11, 0x60, 0x00, 0x00, len(self.measurements)])
            + len(record).to_bytes(3, "little")
            + record
            + os.urandom(32)
            + len(opaque).to_bytes(2, "little")
            + opaque
        )
        signed = request + response
        r, s = decode_dss_signature(self.leaf_key.sign(signed, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big") if sign else bytes(96)
        return signed + signature

    def evidence(self, nonce: bytes, rims: tuple[bytes, ...] = ()) -> dict[str, object]:
        doc: dict[str, object] = {
            "kind": "nvidia-gpu",
            "gpus": [{"report": b64e(self.report(nonce)), "cert_chain": pem(*self.chain)}],
        }
        if rims:
            doc["rims"] = [b64e(r) for r in rims]
        return doc


# --- RIMs ----------------------------------------------------------------------------------------------

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
TCG_NS = "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"


def sign_rim(
    xml: bytes, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate], reference_uri: str | None = None
) -> bytes:
    """An enveloped XML-DSig signature as NVIDIA's RIMs carry (ECDSA-SHA384, C14N 1.1, the chain in KeyInfo)."""
    from lxml import etree
    from signxml import XMLSigner
    from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureConstructionMethod, SignatureMethod

    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA384,
        digest_algorithm=DigestAlgorithm.SHA384,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
    signed = signer.sign(etree.fromstring(xml), key=key, cert=pems, reference_uri=reference_uri)
    return bytes(etree.tostring(signed))


def rim_xml(version: str, golden: dict[int, tuple[bytes, ...]], tag: str = "t1") -> bytes:
    """A RIM in NVIDIA's layout: the measurements in ``golden`` active (RIM index = SPDM block - 1)."""
    resources = "".join(
        f'<Resource type="Measurement" index="{index}" active="True" alternatives="{len(values)}"'
        + "".join(f' ns2:Hash{k}="{v.hex()}"' for k, v in enumerate(values))
        + f' name="Measurement_{index}" size="48"/>'
        for index, values in sorted(golden.items())
    )
    return (
        f'<SoftwareIdentity xmlns="{SWID_NS}" xmlns:ns2="{SHA384_NS}" name="GH100" tagId="{tag}" version="1.0">'
        f'<Entity name="NVIDIA Corporation" role="softwareCreator tagCreator"/>'
        f'<Meta xmlns:ns1="{TCG_NS}" colloquialVersion="{version}" product="GH100" '
        f'ns1:FirmwareManufacturer="NVIDIA Corporation" ns1:FirmwareManufacturerId="5703"/>'
        f"<Payload>{resources}</Payload></SoftwareIdentity>"
    ).encode()


@dataclass
class RimSignerUnderTestRoots:
    """A RIM root -> signing CA -> signer of the test's own, shaped like NVIDIA's (P-384, SHA-384)."""

    root: x509.Certificate
    chain: list[x509.Certificate]
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls) -> RimSignerUnderTestRoots:
        root_key, ca_key, key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
        root = certificate("Test RIM root", root_key, None, ca=True)
        ca = certificate("Test RIM CA", ca_key, (root.subject, root_key), ca=True)
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        signer = certificate("Test RIM signer", key, (ca.subject, ca_key), ca=False, extensions=(usage,))
        return cls(root, [signer, ca, root], key)

    def rims_for(self, gpu: GpuUnderTestRoots, split: int = 21) -> tuple[bytes, bytes]:
        """Driver and VBIOS RIMs whose golden values are ``gpu``'s measurements (VBIOS below ``split``)."""
        golden = {block - 1: (value,) for block, value in gpu.measurements.items()}
        vbios_version = "{3:02X}.{2:02X}.{1:02X}.{0:02X}.{4:02X}".format(*gpu.vbios_version)
        driver = {i: v for i, v in golden.items() if i >= split}
        vbios = {i: v for i, v in golden.items() if i < split}
        return (
            sign_rim(rim_xml(gpu.driver_version, driver, "driver"), self.key, self.chain),
            sign_rim(rim_xml(vbios_version, vbios, "vbios"), self.key, self.chain),
        )
