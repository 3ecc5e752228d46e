"""A strict parser of the SPDM 1.1 measurement exchange an NVIDIA GPU signs: GET_MEASUREMENTS + MEASUREMENTS.

An NVIDIA Hopper GPU in confidential-computing mode answers the driver's ``GET_MEASUREMENTS`` (DMTF DSP0274
1.1, section 10.11) with every measurement block, the requester's nonce echoed in the request, and an ECDSA
P-384 signature over the request followed by the response up to the signature. The evidence is those two
messages back to back, exactly as NVML returns them::

    request  (37 bytes) : version 0x11 | code 0xE0 | attributes 0x01 (sign) | operation 0xFF (all) | nonce[32] | slot
    response            : version 0x11 | code 0x60 | param1 0 | slot | block count | record length (3, LE)
                          | blocks | responder nonce[32] | opaque length (2, LE) | opaque data | signature[96]
    block               : index | specification 0x01 (DMTF) | size (2, LE) | value type | value size (2, LE) | value

Every length is checked against what it frames, nothing may trail, block indices are unique, and every
measurement is a 48-byte SHA-384 digest (raw bit streams are refused: a verifier compares digests). The
opaque data is NVIDIA's list of ``type (2, LE) | size (2, LE) | value`` fields (driver and VBIOS versions,
FWID, chip SKU, ...); a field that appears twice is refused, so there is never a question of which copy was
meant. Parsing proves nothing by itself: :mod:`modelseal.attest.nvidia` checks the signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelseal.attest.base import EvidenceError

SPDM_1_1 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
SIGNATURE_REQUESTED = 0x01
ALL_MEASUREMENTS = 0xFF
DMTF_SPECIFICATION = 0x01
NONCE_SIZE = 32
REQUEST_SIZE = 4 + NONCE_SIZE + 1
DIGEST_SIZE = 48  # SHA-384, the hash Hopper negotiates
SIGNATURE_SIZE = 96  # ECDSA P-384, r || s
MAX_OPAQUE = 1024  # DSP0274 1.1 caps OpaqueLength at 1024
MAX_REPORT = 8192  # NVML's attestation-report buffer

# NVIDIA's opaque-data field types (nvtrust, local_gpu_verifier attestation/spdm_msrt_resp_msg.py)
OPAQUE_FIELDS = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
}


@dataclass(frozen=True)
class MeasurementReport:
    """A parsed GET_MEASUREMENTS request and its MEASUREMENTS response (signature not yet checked)."""

    request_nonce: bytes
    slot: int
    measurements: dict[int, bytes]  # SPDM block index (1-based) -> SHA-384 digest
    responder_nonce: bytes
    opaque: dict[str, bytes]  # NVIDIA opaque fields by name (unknown types as "type_N")
    signed: bytes  # request + response up to the signature: what the signature covers
    signature: bytes

    def text(self, field: str) -> str:
        """An opaque field holding NUL-padded ASCII (driver version, project, SKU), or "" if absent."""
        raw = self.opaque.get(field, b"")
        value = raw.split(b"\0", 1)[0]
        if any(not 0x20 <= c < 0x7F for c in value):
            raise EvidenceError(f"the GPU report's {field} is not printable ASCII")
        return value.decode("ascii")

    @property
    def vbios_version(self) -> str:
        """The VBIOS version as NVIDIA writes it (``96.00.9F.00.01``), from the 8-byte little-endian field."""
        raw = self.opaque.get("vbios_version", b"")
        if len(raw) != 8:
            raise EvidenceError(f"the GPU report's VBIOS version is {len(raw)} bytes, not 8")
        value = int.from_bytes(raw, "little")
        parts = [(value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF, (value >> 32) & 0xFF]
        return ".".join(f"{p:02X}" for p in parts)


def _u16(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "little")


def parse_request(request: bytes) -> tuple[bytes, int]:
    """The nonce and slot of a GET_MEASUREMENTS request that asks for every measurement, signed."""
    if len(request) != REQUEST_SIZE:
        raise EvidenceError(f"the GPU report's request is {len(request)} bytes, not {REQUEST_SIZE}")
    version, code, attributes, operation = request[:4]
    if version != SPDM_1_1:
        raise EvidenceError(f"the GPU report's request is SPDM version 0x{version:02x}, not 1.1")
    if code != GET_MEASUREMENTS:
        raise EvidenceError(f"the GPU report's request code is 0x{code:02x}, not GET_MEASUREMENTS")
    if attributes != SIGNATURE_REQUESTED:
        raise EvidenceError(f"the GPU report's request attributes are 0x{attributes:02x}: no signature asked for")
    if operation != ALL_MEASUREMENTS:
        raise EvidenceError(f"the GPU report's request asks for measurement {operation}, not all of them")
    slot = request[-1]
    if slot > 7:
        raise EvidenceError(f"the GPU report's request names certificate slot {slot} (0-7)")
    return request[4 : 4 + NONCE_SIZE], slot


def parse_blocks(record: bytes, count: int) -> dict[int, bytes]:
    """The measurement record: ``count`` DMTF blocks that exactly fill it, each a SHA-384 digest."""
    blocks: dict[int, bytes] = {}
    pos = 0
    while pos < len(record):
        if pos + 7 > len(record):
            raise EvidenceError(f"the GPU report's measurement record ends inside block {len(blocks) + 1}'s header")
        index, specification, size = record[pos], record[pos + 1], _u16(record, pos + 2)
        if specification != DMTF_SPECIFICATION:
            raise EvidenceError(f"GPU measurement block {index} is not DMTF-formed ({specification:#04x})")
        if index in blocks or index == 0:
            raise EvidenceError(f"GPU measurement block index {index} is {'repeated' if index else 'zero'}")
        value_type, value_size = record[pos + 4], _u16(record, pos + 5)
        if size != 3 + value_size:
            raise EvidenceError(f"GPU measurement block {index}'s size {size} disagrees with its value's {value_size}")
        if value_type & 0x80:
            raise EvidenceError(f"GPU measurement block {index} is a raw bit stream, not a digest")
        if value_size != DIGEST_SIZE:
            raise EvidenceError(f"GPU measurement block {index} is {value_size} bytes, not a SHA-384 digest")
        end = pos + 4 + size
        if end > len(record):
            raise EvidenceError(f"GPU measurement block {index} runs past the measurement record")
        blocks[index] = record[pos + 7 : end]
        pos = end
    if len(blocks) != count:
        raise EvidenceError(f"the GPU report announces {count} measurement blocks but holds {len(blocks)}")
    return blocks


def parse_opaque(data: bytes) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise EvidenceError("the GPU report's opaque data ends inside a field header")
        kind, size = _u16(data, pos), _u16(data, pos + 2)
        if pos + 4 + size > len(data):
            raise EvidenceError(f"the GPU report's opaque field {kind} runs past the opaque data")
        name = OPAQUE_FIELDS.get(kind, f"type_{kind}")
        if name in fields:
            raise EvidenceError(f"the GPU report's opaque field {name} appears twice")
        fields[name] = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return fields


def parse_report(report: bytes) -> MeasurementReport:
    """Parse a GET_MEASUREMENTS request followed by its signed MEASUREMENTS response, refusing anything loose."""
    if len(report) > MAX_REPORT:
        raise EvidenceError(f"the GPU report is {len(report)} bytes, more than NVML's {MAX_REPORT}")
    nonce, slot = parse_request(report[:REQUEST_SIZE])
    response = report[REQUEST_SIZE:]
    if len(response) < 8:
        raise EvidenceError("the GPU report's response is truncated")
    version, code, param1, param2, count = response[:5]
    if version != SPDM_1_1:
        raise EvidenceError(f"the GPU report's response is SPDM version 0x{version:02x}, not 1.1")
    if code != MEASUREMENTS:
        raise EvidenceError(f"the GPU report's response code is 0x{code:02x}, not MEASUREMENTS")
    if param1 != 0:
        raise EvidenceError(f"the GPU report's response param1 is {param1}, not 0 (all measurements were asked for)")
    if param2 != slot:
        raise EvidenceError(f"the GPU report's response is for slot {param2}, the request for slot {slot}")
    record_length = int.from_bytes(response[5:8], "little")
    pos = 8 + record_length
    if pos + NONCE_SIZE + 2 > len(response):
        raise EvidenceError("the GPU report's measurement record runs past the response")
    blocks = parse_blocks(response[8:pos], count)
    responder_nonce = response[pos : pos + NONCE_SIZE]
    opaque_length = _u16(response, pos + NONCE_SIZE)
    pos += NONCE_SIZE + 2
    if pos + opaque_length > len(response):
        raise EvidenceError("the GPU report's opaque data runs past the response")
    if opaque_length > MAX_OPAQUE:
        raise EvidenceError(f"the GPU report's opaque data is {opaque_length} bytes, more than SPDM's {MAX_OPAQUE}")
    opaque = parse_opaque(response[pos : pos + opaque_length])
    pos += opaque_length
    if len(response) - pos != SIGNATURE_SIZE:
        raise EvidenceError(
            f"the GPU report's signature is {len(response) - pos} bytes, not {SIGNATURE_SIZE} (ECDSA P-384)"
        )
    return MeasurementReport(
        request_nonce=nonce,
        slot=slot,
        measurements=blocks,
        responder_nonce=responder_nonce,
        opaque=opaque,
        signed=report[: REQUEST_SIZE + pos],
        signature=response[pos:],
    )
