"""Parsers for the three TPM 2.0 structures a quote needs (TPM 2.0 Library, Part 2), big-endian wire format.

- ``TPM2B_PUBLIC`` / ``TPMT_PUBLIC``: the attestation key (AK), its attributes and its TPM *name*
  (``nameAlg || H(TPMT_PUBLIC)``), the identity an owner pins in a grant.
- ``TPMS_ATTEST`` (quote): magic, type, qualified signer, ``extraData`` (our binding), clock, the PCR
  selection and the digest of the selected PCR values.
- ``TPMT_SIGNATURE``: ECDSA (r, s) or RSASSA/RSAPSS, turned into what ``cryptography`` verifies.

Every length is checked; a truncated or padded structure is an :class:`EvidenceError`, never an index error.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelseal.attest.base import EvidenceError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA = 0x0014, 0x0016, 0x0018
HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    0x0004: ("sha1", hashes.SHA1),
    0x000B: ("sha256", hashes.SHA256),
    0x000C: ("sha384", hashes.SHA384),
    0x000D: ("sha512", hashes.SHA512),
}
CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1()}

# TPMA_OBJECT bits an attestation key must have: the TPM made it, it cannot leave the TPM, and it is a
# *restricted* signing key, so the TPM signs only structures it generated itself (starting with
# TPM_GENERATED_VALUE) and a host cannot have it sign a forged quote.
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
AK_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN


class Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EvidenceError(f"{self.what} is truncated (needs {self.pos + n} bytes, has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise EvidenceError(f"{self.what} has {len(self.data) - self.pos} unexpected trailing bytes")


def hash_name(alg: int, what: str) -> str:
    if alg not in HASHES:
        raise EvidenceError(f"{what} uses unsupported hash algorithm 0x{alg:04x}")
    return HASHES[alg][0]


@dataclass(frozen=True)
class AttestationKey:
    name: str  # hex: nameAlg || H(TPMT_PUBLIC)
    attributes: int
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def parse_public(tpm2b_public: bytes) -> AttestationKey:
    """Parse a ``TPM2B_PUBLIC`` (what ``tpm2_readpublic -f tss`` writes) into an attestation key."""
    outer = Reader(tpm2b_public, "TPM2B_PUBLIC")
    body = outer.tpm2b()
    outer.end()
    r = Reader(body, "TPMT_PUBLIC")
    key_type, name_alg, attributes = r.u16(), r.u16(), r.u32()
    r.tpm2b()  # authPolicy
    if r.u16() != ALG_NULL:  # symmetric: a signing key has none
        raise EvidenceError("the attestation key has a symmetric algorithm: it is a storage key, not a signing key")
    scheme = r.u16()
    if scheme != ALG_NULL:
        r.u16()  # scheme hash
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if key_type == ALG_ECC:
        curve_id = r.u16()
        if r.u16() != ALG_NULL:  # kdf
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
        if curve_id not in CURVES:
            raise EvidenceError(f"the attestation key uses unsupported ECC curve 0x{curve_id:04x}")
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), CURVES[curve_id]
            ).public_key()
        except ValueError:
            raise EvidenceError("the attestation key's ECC point is not on its curve") from None
    elif key_type == ALG_RSA:
        r.u16()  # keyBits
        exponent = r.u32() or 65537
        modulus = r.tpm2b()
        try:
            public_key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError:
            raise EvidenceError("the attestation key's RSA modulus or exponent is invalid") from None
    else:
        raise EvidenceError(f"the attestation key has unsupported type 0x{key_type:04x}")
    r.end()
    digest = hashlib.new(hash_name(name_alg, "the attestation key's name"), body).digest()
    name = (struct.pack(">H", name_alg) + digest).hex()
    return AttestationKey(name=name, attributes=attributes, public_key=public_key)


def check_attestation_key(key: AttestationKey) -> None:
    missing = AK_REQUIRED & ~key.attributes
    if missing or key.attributes & DECRYPT:
        raise EvidenceError(
            "the attestation key is not a restricted, TPM-resident signing key "
            f"(attributes 0x{key.attributes:08x}; needs fixedTPM, fixedParent, sensitiveDataOrigin, restricted, "
            "sign and no decrypt)"
        )


@dataclass(frozen=True)
class Quote:
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: list[tuple[str, list[int]]]  # (bank, PCR indices ascending), in quote order
    pcr_digest: bytes


def parse_quote(attest: bytes) -> Quote:
    """Parse a ``TPMS_ATTEST`` of type quote (``tpm2_quote -m``)."""
    r = Reader(attest, "TPMS_ATTEST")
    if r.u32() != TPM_GENERATED_VALUE:
        raise EvidenceError("the quote does not start with TPM_GENERATED_VALUE: the TPM did not produce it")
    if r.u16() != TPM_ST_ATTEST_QUOTE:
        raise EvidenceError("the TPM attestation structure is not a quote")
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    selection = []
    for _ in range(r.u32()):
        bank = hash_name(r.u16(), "the quote's PCR selection")
        bitmap = r.take(r.u8())
        indices = [8 * i + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1]
        selection.append((bank, indices))
    digest = r.tpm2b()
    r.end()
    return Quote(signer, extra, clock, resets, restarts, bool(safe), firmware, selection, digest)


@dataclass(frozen=True)
class Signature:
    algorithm: int
    hash: type[hashes.HashAlgorithm]
    value: bytes  # DER for ECDSA, raw for RSA


def parse_signature(data: bytes) -> Signature:
    """Parse a ``TPMT_SIGNATURE`` (``tpm2_quote -s``)."""
    r = Reader(data, "TPMT_SIGNATURE")
    alg, hash_alg = r.u16(), r.u16()
    hash_name(hash_alg, "the quote signature")
    if alg == ALG_ECDSA:
        sig_r, sig_s = r.tpm2b(), r.tpm2b()
        value = encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))
    elif alg in (ALG_RSASSA, ALG_RSAPSS):
        value = r.tpm2b()
    else:
        raise EvidenceError(f"unsupported quote signature scheme 0x{alg:04x}")
    r.end()
    return Signature(alg, HASHES[hash_alg][1], value)
