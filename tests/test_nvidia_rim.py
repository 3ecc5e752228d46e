"""NVIDIA RIM verification (modelseal.attest.nvidia_rim) on NVIDIA's own signed samples and on documents
signed here by a throwaway CA, so that every content rule is exercised behind a signature that verifies."""

from __future__ import annotations

import base64
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from modelseal.attest.base import EvidenceError
from modelseal.attest.nvidia_rim import MAX_RIM_BYTES, Rim, golden_measurements, verify_rim
from tests.gpu_evidence import sign_rim

DATA = Path(__file__).parent / "data" / "attestation" / "nvidia"
RIM_ROOT = x509.load_pem_x509_certificate((DATA / "verifier_RIM_root.pem").read_bytes())
DEVICE_ROOT = x509.load_pem_x509_certificate((DATA / "verifier_device_root.pem").read_bytes())
DRIVER = (DATA / "Driver_RIM_test_no_gpu.swidtag").read_bytes()
VBIOS = (DATA / "1010_0200_882_96005E0001_test_no_gpu.swidtag").read_bytes()
VBIOS_PROD = (DATA / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes()
SAMPLES = {"driver RIM": DRIVER, "VBIOS RIM": VBIOS, "production VBIOS RIM": VBIOS_PROD}

# Every signing certificate in the samples is valid 2023-06-27T06:10:12Z .. 2025-06-22T09:30:33Z (the
# driver RIM's leaf from 2023-06-27 to 2025-06-26, the VBIOS RIMs' leaves from 2023-06-23 to 2025-06-22;
# the L3 CA to 2026-11-11, the GH100 CA to 2033, the root to 2053).
AT = datetime(2024, 6, 1, tzinfo=UTC)
SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"


def verify(xml: bytes, what: str = "driver RIM", root: x509.Certificate = RIM_ROOT, at: datetime = AT) -> Rim:
    return verify_rim(xml, root=root, at=at, what=what)


@pytest.fixture(scope="module")
def genuine() -> dict[str, Rim]:
    return {what: verify(xml, what) for what, xml in SAMPLES.items()}


# --- NVIDIA's samples ----------------------------------------------------------------------------------


def test_genuine_driver_rim(genuine: dict[str, Rim]) -> None:
    rim = genuine["driver RIM"]
    assert (rim.name, rim.product, rim.version, rim.colloquial_version) == ("GH100", "GH100", "1.0", "545.00")
    assert (rim.manufacturer, rim.manufacturer_id) == ("NVIDIA Corporation", "5703")
    assert rim.tag_id.startswith("f0d3a263ab9ef4b9")
    assert sorted(rim.measurements) == list(range(64))
    assert [i for i, m in rim.measurements.items() if m.active] == [7, *range(21, 41)]
    assert {i: len(m.alternatives) for i, m in rim.measurements.items() if len(m.alternatives) > 1} == {
        23: 2, 24: 2, 35: 2}
    assert all(m.size == 48 and all(len(h) == 48 for h in m.alternatives) for m in rim.measurements.values())
    assert rim.measurements[21].alternatives[0].hex().startswith("193d75c6d4d5")
    assert "HCC RIM L4 Signer" in rim.signer
    assert rim.not_after == datetime(2025, 6, 26, 6, 10, 12, tzinfo=UTC)


def test_genuine_vbios_rim(genuine: dict[str, Rim]) -> None:
    rim = genuine["VBIOS RIM"]
    assert rim.colloquial_version == "96.00.5E.00.01"
    assert [i for i, m in rim.measurements.items() if m.active] == [*range(7), *range(8, 13)]
    assert len(rim.measurements[12].alternatives) == 4
    assert rim.not_after == datetime(2025, 6, 22, 9, 38, 54, tzinfo=UTC)


def test_production_and_test_vbios_rims_differ_only_in_measurements_and_signer(genuine: dict[str, Rim]) -> None:
    """NVIDIA signs both with the same chain and gives them the same tag id and version: only the FSP
    measurements (and the leaf certificate) differ, so which applies is for the report to decide."""
    test, prod = genuine["VBIOS RIM"], genuine["production VBIOS RIM"]
    assert (test.tag_id, test.colloquial_version, test.signer) == (prod.tag_id, prod.colloquial_version, prod.signer)
    assert test.signer_sha256 != prod.signer_sha256
    differ = sorted(i for i in test.measurements if test.measurements[i] != prod.measurements[i])
    assert differ == [1, 2, 3, 9]


def test_golden_measurements_merge_driver_and_vbios(genuine: dict[str, Rim]) -> None:
    driver, vbios = genuine["driver RIM"], genuine["VBIOS RIM"]
    golden = golden_measurements(driver, vbios)
    assert sorted(golden) == [*range(13), *range(21, 41)]
    assert golden[7] == driver.measurements[7].alternatives  # inactive in the VBIOS RIM, active in the driver's
    assert golden[12] == vbios.measurements[12].alternatives
    clash = dataclasses.replace(vbios, measurements={
        **vbios.measurements, 21: dataclasses.replace(vbios.measurements[21], active=True)})
    with pytest.raises(EvidenceError, match="both set measurement index 21 active"):
        golden_measurements(driver, clash)
    idle = dataclasses.replace(vbios, measurements={
        i: dataclasses.replace(m, active=False) for i, m in vbios.measurements.items()})
    with pytest.raises(EvidenceError, match=r"the VBIOS RIM \(96.00.5E.00.01\) has no active measurement"):
        golden_measurements(driver, idle)


@pytest.mark.parametrize("root", [DEVICE_ROOT, None], ids=["device-root", "self-made-ca"])
def test_other_root_refused(root: x509.Certificate | None, test_pki: TestPki) -> None:
    with pytest.raises(EvidenceError, match=r"^driver RIM: .*does not lead to the pinned NVIDIA RIM root"):
        verify(DRIVER, root=root or test_pki.root)


@pytest.mark.parametrize(("at", "reason"), [
    (datetime(2025, 7, 1, tzinfo=UTC), r"'HCC RIM L4 Signer' expired at 2025-06-26T06:10:12\+00:00"),
    (datetime(2023, 6, 1, tzinfo=UTC), r"'HCC RIM L4 Signer' is not valid before 2023-06-27T06:10:12\+00:00"),
    (datetime(2026, 12, 1, tzinfo=UTC), "expired at"),
])
def test_time_outside_validity_refused(at: datetime, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        verify(DRIVER, at=at)


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_rim(DRIVER, root=RIM_ROOT, at=datetime(2024, 6, 1), what="driver RIM")


def test_changed_golden_hash_refused() -> None:
    """Putting the production FSP hash into the test RIM (re-serialised by lxml) breaks the digest."""
    doc = etree.fromstring(VBIOS)
    resource = doc.find(f"{{{SWID}}}Payload/{{{SWID}}}Resource[@index='1']")
    prod = etree.fromstring(VBIOS_PROD).find(f"{{{SWID}}}Payload/{{{SWID}}}Resource[@index='1']")
    resource.set(f"{{{SHA384_NS}}}Hash0", prod.get(f"{{{SHA384_NS}}}Hash0"))
    with pytest.raises(EvidenceError, match="VBIOS RIM: the signed content was changed"):
        verify(etree.tostring(doc), "VBIOS RIM")
    assert verify(etree.tostring(etree.fromstring(VBIOS)), "VBIOS RIM").measurements[1].alternatives[0].hex()[:8] \
        == "0b42836f"  # the re-serialised original still verifies: the refusal above is the hash


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(what=st.sampled_from(sorted(SAMPLES)), data=st.data())
def test_bit_flips_refused_or_harmless(what: str, data: st.DataObject, genuine: dict[str, Rim]) -> None:
    """One flipped bit anywhere is refused, or (in a spot the signature does not cover, such as whitespace
    between attributes) yields exactly the genuine RIM: never other measurements."""
    xml = bytearray(SAMPLES[what])
    position = data.draw(st.integers(0, len(xml) - 1), label="position")
    xml[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    try:
        rim = verify(bytes(xml), what)
    except EvidenceError as exc:
        assert str(exc).startswith(what) and "\n" not in str(exc)
    else:
        assert rim == genuine[what]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(what=st.sampled_from(sorted(SAMPLES)), data=st.data())
def test_whitespace_swaps_refused_or_harmless(what: str, data: st.DataObject, genuine: dict[str, Rim]) -> None:
    xml = bytearray(SAMPLES[what])
    spaces = [i for i, b in enumerate(xml) if b in b" \n\t\r"]
    position = data.draw(st.sampled_from(spaces), label="position")
    xml[position] = data.draw(st.sampled_from(b" \n\t\r"), label="byte")
    try:
        rim = verify(bytes(xml), what)
    except EvidenceError:
        pass
    else:
        assert rim == genuine[what]


@pytest.mark.parametrize("n", range(4))
def test_corrupt_certificate_key_refused(n: int, genuine: dict[str, Rim]) -> None:
    """A chain certificate whose key algorithm OID no longer parses (cryptography reads keys lazily) is
    refused; the fourth is the RIM's own copy of the root, which is never used (the pinned one is)."""
    texts = [t.split(b"</ds:X509Certificate>")[0] for t in VBIOS.split(b"<ds:X509Certificate>")[1:]]
    der = bytearray(base64.b64decode(b"".join(texts[n].split())))
    oid = der.index(bytes.fromhex("06072a8648ce3d0201"))  # id-ecPublicKey
    der[oid + 8] ^= 0x02
    forged = VBIOS.replace(texts[n], base64.encodebytes(bytes(der)).strip())
    if n == 3:
        assert verify(forged, "VBIOS RIM") == genuine["VBIOS RIM"]
        return
    with pytest.raises(EvidenceError, match=r"^VBIOS RIM: "):
        verify(forged, "VBIOS RIM")


@pytest.mark.slow
def test_bit_flip_sweep_over_the_signature_and_certificates(genuine: dict[str, Rim]) -> None:
    """Deterministic: one bit flipped at every third byte of the VBIOS RIM's signature and certificates
    (where parsing is deepest; random positions rarely land there)."""
    start = VBIOS.index(b"<ds:Signature")
    for position in range(start, len(VBIOS), 3):
        xml = bytearray(VBIOS)
        xml[position] ^= 1 << (position % 8)
        try:
            rim = verify(bytes(xml), "VBIOS RIM")
        except EvidenceError:
            continue
        assert rim == genuine["VBIOS RIM"], position


def test_whitespace_between_attributes_is_harmless(genuine: dict[str, Rim]) -> None:
    xml = DRIVER.replace(b'type="Measurement" index="21"', b'type="Measurement"\n\t index="21"', 1)
    assert xml != DRIVER
    assert verify(xml) == genuine["driver RIM"]


# --- signature wrapping --------------------------------------------------------------------------------


def _forged_payload() -> etree._Element:
    payload = etree.Element(f"{{{SWID}}}Payload")
    for index in range(64):
        etree.SubElement(payload, f"{{{SWID}}}Resource", {
            "type": "Measurement", "index": str(index), "active": "True", "alternatives": "1",
            f"{{{SHA384_NS}}}Hash0": "ab" * 48, "name": f"forged_{index}", "size": "48"})
    return payload


def _second_payload_appended(xml: bytes) -> bytes:
    doc = etree.fromstring(xml)
    doc.append(_forged_payload())
    return etree.tostring(doc)


def _second_payload_first(xml: bytes) -> bytes:
    doc = etree.fromstring(xml)
    doc.insert(0, _forged_payload())
    return etree.tostring(doc)


def _payload_replaced_signature_kept(xml: bytes) -> bytes:
    doc = etree.fromstring(xml)
    old = doc.find(f"{{{SWID}}}Payload")
    doc.replace(old, _forged_payload())
    return etree.tostring(doc)


def _wrapped_in_forged_identity(xml: bytes) -> bytes:
    """The genuine signed document becomes a child of a forged one with its own Payload."""
    genuine = etree.fromstring(xml)
    outer = etree.Element(f"{{{SWID}}}SoftwareIdentity", dict(genuine.attrib))
    outer.append(genuine.find(f"{{{SWID}}}Meta"))
    outer.append(_forged_payload())
    outer.append(etree.fromstring(xml))
    return etree.tostring(outer)


def _signature_moved_out(xml: bytes) -> bytes:
    """The signature goes to the top of a forged document; the genuine one hides in its ds:Object."""
    genuine = etree.fromstring(xml)
    signature = genuine.find("{http://www.w3.org/2000/09/xmldsig#}Signature")
    genuine.remove(signature)
    forged = etree.fromstring(xml)
    forged.remove(forged.find("{http://www.w3.org/2000/09/xmldsig#}Signature"))
    forged.replace(forged.find(f"{{{SWID}}}Payload"), _forged_payload())
    holder = etree.SubElement(signature, "{http://www.w3.org/2000/09/xmldsig#}Object")
    holder.append(genuine)
    forged.append(signature)
    return etree.tostring(forged)


@pytest.mark.parametrize("attack", [
    _second_payload_appended, _second_payload_first, _payload_replaced_signature_kept,
    _wrapped_in_forged_identity, _signature_moved_out,
])
def test_signature_wrapping_never_yields_unsigned_measurements(attack: object) -> None:
    forged = attack(VBIOS)  # type: ignore[operator]
    with pytest.raises(EvidenceError, match=r"^VBIOS RIM: "):
        verify(forged, "VBIOS RIM")


# --- hostile XML ---------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE SoftwareIdentity [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd" name="&f;"/>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE SoftwareIdentity [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd" name="&x;"/>"""


def _deep(depth: int) -> bytes:
    return (b'<SoftwareIdentity xmlns="' + SWID.encode() + b'">' + b"<a>" * depth + b"</a>" * depth
            + b"</SoftwareIdentity>")


@pytest.mark.parametrize(("xml", "reason"), [
    (BILLION_LAUGHS, "DTD or entity declaration"),
    (EXTERNAL_ENTITY, "DTD or entity declaration"),
    (EXTERNAL_ENTITY.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>')
     .decode().encode("utf-16"), "not UTF-8"),
    (DRIVER + b" " * (MAX_RIM_BYTES + 1 - len(DRIVER)), "over the 4194304-byte limit"),
    (b"\x00\x01\x02 not xml", "not well-formed XML"),
    (b"", "not well-formed XML"),
    (b"<SoftwareIdentity", "not well-formed XML"),
    (_deep(200), "nested deeper than 32"),
    (b'<Foo xmlns="' + SWID.encode() + b'"/>', "root element is 'Foo'"),
    (DRIVER.replace(SWID.encode(), b"urn:other"), "not a SWID SoftwareIdentity"),
    (b'<SoftwareIdentity xmlns="' + SWID.encode() + b'"/>', "exactly one XML signature"),
], ids=["billion-laughs", "external-entity", "utf16-external-entity", "oversize", "binary", "empty",
        "truncated", "deep", "wrong-root", "wrong-namespace", "unsigned"])
def test_hostile_documents_refused_quickly(xml: bytes, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(EvidenceError, match=f"^driver RIM: .*{reason}"):
        verify(xml)
    assert time.monotonic() - started < 2


def test_not_bytes_refused() -> None:
    with pytest.raises(EvidenceError, match="expected the RIM's bytes"):
        verify(DRIVER.decode())  # type: ignore[arg-type]


# --- content rules, behind signatures made here --------------------------------------------------------


@dataclasses.dataclass
class TestPki:
    """A root, an intermediate and a signer of our own, shaped like NVIDIA's (P-384, SHA-384)."""

    __test__ = False
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_length: int | None = None,
          signs: bool | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    signs = not ca if signs is None else signs
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(AT - timedelta(days=30)).not_valid_after(AT + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=signs, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(issuer_key, hashes.SHA384())


@pytest.fixture(scope="module")
def test_pki() -> TestPki:
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    root = _cert("test RIM root", keys[0], None, keys[0], ca=True)
    intermediate = _cert("test RIM CA", keys[1], root, keys[0], ca=True, path_length=0)
    signer = _cert("test RIM signer", keys[2], intermediate, keys[1], ca=False)
    return TestPki(root, keys[0], intermediate, keys[1], signer, keys[2])


def _resource(index: object, *, active: str = "True", size: int = 48, hashes_: list[str] | None = None,
              alternatives: object = None, **extra: str) -> str:
    hashes_ = [f"{index:0>2}".encode().hex()[:4] * 24] if hashes_ is None else hashes_
    alternatives = len(hashes_) if alternatives is None else alternatives
    attrs = "".join(f' ns2:Hash{k}="{h}"' for k, h in enumerate(hashes_))
    more = "".join(f' {k}="{v}"' for k, v in extra.items())
    return (f'<Resource type="Measurement" index="{index}" active="{active}" alternatives="{alternatives}"'
            f'{attrs} name="Measurement_{index}" size="{size}"{more}/>')


def _swid(resources: str, *, root: str = "SoftwareIdentity", payloads: int = 1, meta: bool = True) -> bytes:
    meta_xml = ('<Meta xmlns:ns1="https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-'
                'information-model/" colloquialVersion="96.00.5E.00.01" product="GH100" '
                'ns1:FirmwareManufacturer="NVIDIA Corporation" ns1:FirmwareManufacturerId="5703"/>') if meta else ""
    return (f'<{root} xmlns="{SWID}" xmlns:ns2="{SHA384_NS}" name="GH100" tagId="t1" version="1.0">'
            f'<Entity name="NVIDIA Corporation" role="softwareCreator tagCreator"/>{meta_xml}'
            + f"<Payload>{resources}</Payload>" * payloads + f"</{root}>").encode()


def _sign(xml: bytes, pki: TestPki, *, key: ec.EllipticCurvePrivateKey | None = None,
          certs: list[x509.Certificate] | None = None, reference_uri: str | None = None) -> bytes:
    return sign_rim(xml, key or pki.signer_key, certs or [pki.signer, pki.intermediate, pki.root], reference_uri)


GOOD = "".join(_resource(i) for i in range(3)) + _resource(3, active="False")


def test_own_signed_rim_verifies_against_own_root(test_pki: TestPki) -> None:
    """The control for the refusals below: the template, signed here, is accepted."""
    rim = verify(_sign(_swid(GOOD), test_pki), root=test_pki.root)
    assert sorted(rim.measurements) == [0, 1, 2, 3]
    assert rim.measurements[3].active is False and rim.measurements[0].active is True
    assert rim.measurements[1].alternatives == (bytes.fromhex("3031" * 24),)
    assert rim.signer == "CN=test RIM signer"
    with pytest.raises(EvidenceError, match="does not lead to the pinned NVIDIA RIM root"):
        verify(_sign(_swid(GOOD), test_pki))  # NVIDIA's root pinned: our own chain is worth nothing


@pytest.mark.parametrize(("resources", "reason"), [
    (_resource("23a"), "malformed index '23a'"),
    (_resource(" 23"), "malformed index"),
    (_resource(254), r"malformed index '254' \(want 0..253\)"),
    (_resource(-1), "malformed index"),
    (_resource(1) + _resource(1), "measurement index 1 appears twice"),
    (_resource(5, hashes_=["ab" * 47]), "measurement index 5 Hash0 is not 48 bytes of hex"),
    (_resource(5, hashes_=["zz" * 48]), "Hash0 is not 48 bytes of hex"),
    (_resource(5, hashes_=["ab" * 48], alternatives=2), "has 1 hashes, alternatives says 2"),
    (_resource(5, hashes_=["ab" * 48, "cd" * 48], alternatives=1), "has Hash1 but alternatives=1"),
    (_resource(5, hashes_=[]), "malformed alternatives '0'"),
    (_resource(5, active="yes"), "active='yes', not True or False"),
    (_resource(5, size=0, hashes_=[""]), "malformed size '0'"),
    (_resource(5).replace('type="Measurement"', 'type="File"'), "is not of type Measurement"),
    (_resource(5).replace("ns2:Hash0", "ns3:Hash0").replace("<Resource", '<Resource xmlns:ns3="urn:x"'),
     "unexpected attribute 'Hash0'"),
    (_resource(5).replace("<Resource", "<Other"), "Payload holds a 'Other'"),
    ("", "has no golden measurements"),
])
def test_signed_but_malformed_measurements_refused(resources: str, reason: str, test_pki: TestPki) -> None:
    with pytest.raises(EvidenceError, match=f"^VBIOS RIM: .*{reason}"):
        verify(_sign(_swid(resources), test_pki), "VBIOS RIM", root=test_pki.root)


def test_inactive_measurement_may_have_no_alternatives(test_pki: TestPki) -> None:
    rim = verify(_sign(_swid(_resource(5, active="False", hashes_=[])), test_pki), root=test_pki.root)
    assert rim.measurements[5].alternatives == ()


@pytest.mark.parametrize(("xml", "reason"), [
    (_swid(GOOD, payloads=2), "needs exactly one Payload in SoftwareIdentity, has 2"),
    (_swid(GOOD, meta=False), "needs exactly one Meta"),
    (_swid(GOOD, root="Foo"), "root element is 'Foo'"),
    (_swid(GOOD).replace(b' tagId="t1"', b""), "SoftwareIdentity has no 'tagId'"),
], ids=["two-payloads", "no-meta", "wrong-root", "no-tag-id"])
def test_signed_but_malformed_documents_refused(xml: bytes, reason: str, test_pki: TestPki) -> None:
    with pytest.raises(EvidenceError, match=reason):
        verify(_sign(xml, test_pki), root=test_pki.root)


def test_signature_covering_only_part_of_the_document_refused(test_pki: TestPki) -> None:
    """A signature over the Payload alone (Reference URI="#p") leaves Meta unsigned: refused."""
    xml = _swid(GOOD).replace(b"<Payload>", b'<Payload Id="p">')
    with pytest.raises(EvidenceError, match="must cover the whole document"):
        verify(_sign(xml, test_pki, reference_uri="#p"), root=test_pki.root)


def test_chain_rules(test_pki: TestPki) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    p = test_pki
    sub = _cert("sub CA", p.signer_key, p.intermediate, p.intermediate_key, ca=True)
    cases = {
        "is a CA certificate": [_cert("ca signer", key, p.intermediate, p.intermediate_key, ca=True), p.intermediate],
        "may not sign \\(key usage\\)": [
            _cert("no-sign signer", key, p.intermediate, p.intermediate_key, ca=False, signs=False), p.intermediate],
        "does not lead to the pinned": [_cert("self signer", key, None, key, ca=False)],
        "issues a certificate but is not a CA": [
            _cert("leaf2", key, p.signer, p.signer_key, ca=False), p.signer, p.intermediate],
        "allows 0 CAs below it": [_cert("deep signer", key, sub, p.signer_key, ca=False), sub, p.intermediate],
    }
    for reason, certs in cases.items():
        with pytest.raises(EvidenceError, match=reason):
            verify(_sign(_swid(GOOD), p, key=key, certs=certs), root=p.root)
    with pytest.raises(EvidenceError, match="signed by the root certificate itself"):
        verify(_sign(_swid(GOOD), p, key=p.root_key, certs=[p.root]), root=p.root)
    with pytest.raises(EvidenceError, match="bad XML signature"):  # a chain that verifies, another key signed
        verify(_sign(_swid(GOOD), p, key=key), root=p.root)
