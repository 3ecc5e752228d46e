"""AMD SEV-SNP evidence made by the tests under their own ARK (trusted only where a test configures it with
``[attestation] snp_ark_sha256``): an ARK -> ASK -> VCEK chain as AMD's (RSA-PSS/SHA-384 certificates, a
P-384 VCEK carrying the chip id and TCB extensions) and a version-2 report signed by the VCEK, carrying the
report data the test asks for. The public Milan sample has its own fixed report data, so a test that needs
SNP evidence bound to *its* challenge makes it here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from modelseal.attest.snp import OID_HWID, OID_SPL, REPORT_SIZE, SIGNED_SIZE, TCB_BYTE
from modelseal.encoding import b64e
from tests.gpu_evidence import END, START

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.DIGEST_LENGTH)
TCB = {"boot_loader": 3, "tee": 0, "snp": 8, "microcode": 115}


def _cert(
    cn: str, public: object, issuer: x509.Name | None, key: rsa.RSAPrivateKey, ca: bool, extensions: tuple = ()
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(END)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA384(), rsa_padding=PSS)


@dataclass
class SnpUnderTestRoots:
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes

    @classmethod
    def make(cls) -> SnpUnderTestRoots:
        ark_key = rsa.generate_private_key(65537, 2048)
        ask_key = rsa.generate_private_key(65537, 2048)
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        chip_id = os.urandom(64)
        ark = _cert("Test ARK", ark_key.public_key(), None, ark_key, True)
        ask = _cert("Test ASK", ask_key.public_key(), ark.subject, ark_key, True)
        extensions = (
            x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_HWID), chip_id),
            *(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([0x02, 0x01, TCB[name]]))
                for name, oid in OID_SPL.items()
            ),
        )
        vcek = _cert("Test VCEK", vcek_key.public_key(), ask.subject, ask_key, False, extensions)
        return cls(ark, ask, vcek, vcek_key, chip_id)

    @property
    def ark_sha256(self) -> str:
        return self.ark.fingerprint(hashes.SHA256()).hex()

    def report(self, report_data: bytes, *, measurement: bytes = bytes(48), policy: int = 0x30000) -> bytes:
        report = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", report, 0, 2, 0, policy)
        struct.pack_into("<II", report, 0x30, 0, 1)  # VMPL 0, ECDSA P-384/SHA-384
        report[0x50:0x90] = report_data.ljust(64, b"\0")
        report[0x90:0xC0] = measurement
        for name, position in TCB_BYTE.items():
            report[0x180 + position] = TCB[name]
        report[0x1A0:0x1E0] = self.chip_id
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(report[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
        report[SIGNED_SIZE : SIGNED_SIZE + 72] = r.to_bytes(72, "little")
        report[SIGNED_SIZE + 72 : SIGNED_SIZE + 144] = s.to_bytes(72, "little")
        return bytes(report)

    def evidence(self, report_data: bytes, **report: Any) -> dict[str, str]:
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark))
        return {
            "kind": "sev-snp",
            "report": b64e(self.report(report_data, **report)),
            "vcek": b64e(self.vcek.public_bytes(serialization.Encoding.DER)),
            "cert_chain": chain.decode(),
        }
