"""GPU certificate revocation from OCSP responses the host attaches (modelseal.attest.ocsp), on a GPU chain
and responders of the test's own making: good, revoked, unknown, stale, unsigned by the CA, a delegated
responder with and without the OCSP-signing key usage, damaged bytes; and the host side fetching them
from a real HTTP responder on loopback."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelseal.attest import EvidenceError, VerificationContext
from modelseal.attest.nvidia import NvidiaGpuVerifier, fetch_ocsp
from modelseal.encoding import b64d, b64e
from tests.gpu_evidence import END, START, GpuUnderTestRoots, RimSignerUnderTestRoots, certificate, pem

AT = 1767225600  # 2026-01-01
GOOD: dict[int, bytes] = {}
REVOKED = ocsp.OCSPCertStatus.REVOKED
BEFORE, AFTER = dt.datetime(2025, 6, 1, tzinfo=dt.UTC), dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def made() -> tuple[GpuUnderTestRoots, NvidiaGpuVerifier]:
    gpu, signer = GpuUnderTestRoots.make(), RimSignerUnderTestRoots.make()
    verifier = NvidiaGpuVerifier(
        device_root=pem(gpu.root).encode(), rim_root=pem(signer.root).encode(), rims=signer.rims_for(gpu),
        require_ocsp=True,
    )  # fmt: skip
    return gpu, verifier


def verify(gpu: GpuUnderTestRoots, verifier: NvidiaGpuVerifier, responses: list[bytes] | None) -> None:
    evidence = gpu.evidence(NONCE)
    if responses is not None:
        evidence["gpus"][0]["ocsp"] = [b64e(r) for r in responses]  # type: ignore[index]
    verifier.verify(evidence, VerificationContext(None, NONCE, b"", AT))


def test_good_fresh_responses_for_every_certificate_verify(made) -> None:  # type: ignore[no-untyped-def]
    gpu, verifier = made
    verify(gpu, verifier, [gpu.ocsp(0), gpu.ocsp(1)])
    verify(gpu, verifier, [gpu.ocsp(1), gpu.ocsp(0)])  # in any order


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        (lambda g: None, "has no OCSP responses, which this key service requires"),
        (lambda g: [g.ocsp(0)], "certificate 1: no OCSP response for it was presented"),
        (lambda g: [g.ocsp(0), g.ocsp(0)], "certificate 1: no OCSP response for it was presented"),
        (lambda g: [g.ocsp(0, REVOKED), g.ocsp(1)], r"certificate 0 was revoked \(key_compromise\)"),
        (lambda g: [g.ocsp(0), g.ocsp(1, ocsp.OCSPCertStatus.UNKNOWN)], "does not know the certificate"),
        (lambda g: [g.ocsp(0, next_update=BEFORE), g.ocsp(1)], "not the verification time"),
        (lambda g: [g.ocsp(0, this_update=AFTER), g.ocsp(1)], "not the verification time"),
        (lambda g: [g.ocsp(0, next_update=None), g.ocsp(1)], "has no nextUpdate"),
        (lambda g: [b"not DER", g.ocsp(1)], "OCSP response 0 is malformed"),
        (lambda g: [g.ocsp(0)] * 9, "at most 8 responses"),
    ],
)
def test_missing_revoked_unknown_stale_and_malformed_answers_are_refused(made, responses, message) -> None:  # type: ignore[no-untyped-def]
    gpu, verifier = made
    with pytest.raises(EvidenceError, match=message):
        verify(gpu, verifier, responses(gpu))


def test_only_the_issuer_or_its_certified_ocsp_responder_may_answer(made) -> None:  # type: ignore[no-untyped-def]
    gpu, verifier = made
    stranger_key = ec.generate_private_key(ec.SECP384R1())
    stranger = certificate("Someone's responder", stranger_key, None, ca=False)
    with pytest.raises(EvidenceError, match="was not issued by the CA it answers for"):
        verify(gpu, verifier, [gpu.ocsp(0, signer=(stranger, stranger_key)), gpu.ocsp(1)])
    issuer, issuer_key = gpu.chain[1], gpu.issuer_keys[0]
    key = ec.generate_private_key(ec.SECP384R1())
    plain = certificate("Responder without EKU", key, (issuer.subject, issuer_key), ca=False)
    with pytest.raises(EvidenceError, match="not for OCSP signing"):
        verify(gpu, verifier, [gpu.ocsp(0, signer=(plain, key)), gpu.ocsp(1)])
    eku = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
    delegated = certificate("OCSP responder", key, (issuer.subject, issuer_key), ca=False, extensions=(eku,))
    verify(gpu, verifier, [gpu.ocsp(0, signer=(delegated, key)), gpu.ocsp(1)])


def test_an_answer_from_a_look_alike_issuer_does_not_count(made) -> None:  # type: ignore[no-untyped-def]
    """Same issuer name, another key: the answer's issuer key hash names another CA, so it is not one for
    this certificate (and its signature is that CA's, not the real issuer's)."""
    gpu, verifier = made
    key = ec.generate_private_key(ec.SECP384R1())
    look_alike = certificate("Test GH100 Provisioner ICA", key, None, ca=True)
    answer = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=gpu.chain[0], issuer=look_alike, algorithm=hashes.SHA384(), cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=START, next_update=END, revocation_time=None, revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, look_alike)
        .sign(key, hashes.SHA384())
        .public_bytes(serialization.Encoding.DER)
    )  # fmt: skip
    with pytest.raises(EvidenceError, match="certificate 0: no OCSP response for it was presented"):
        verify(gpu, verifier, [answer, gpu.ocsp(1)])


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_damaged_responses_are_refused_or_mean_the_same(made, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    gpu, verifier = made
    good = GOOD.setdefault(id(gpu), gpu.ocsp(0))  # one response: ECDSA makes each new one differ in length
    damaged = bytearray(good)
    damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        verify(gpu, verifier, [bytes(damaged), gpu.ocsp(1)])
    except EvidenceError:
        return
    # accepted: only possible if the flip missed everything signed and checked (the signed part is intact)
    signed = ocsp.load_der_ocsp_response(bytes(damaged)).tbs_response_bytes
    assert signed == ocsp.load_der_ocsp_response(good).tbs_response_bytes


class _Responder(BaseHTTPRequestHandler):
    answers: ClassVar[dict[bytes, bytes]] = {}

    def do_POST(self) -> None:
        request = ocsp.load_der_ocsp_request(self.rfile.read(int(self.headers["Content-Length"])))
        body = self.answers.get(request.serial_number.to_bytes(20, "big"), b"")
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/ocsp-response")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def responder(made) -> Iterator[str]:  # type: ignore[no-untyped-def]
    gpu, _ = made
    _Responder.answers = {gpu.chain[i].serial_number.to_bytes(20, "big"): gpu.ocsp(i) for i in range(2)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Responder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_host_fetches_answers_a_key_service_accepts(made, responder: str) -> None:  # type: ignore[no-untyped-def]
    gpu, verifier = made
    answers = fetch_ocsp(pem(*gpu.chain), responder)
    assert len(answers) == 2
    verify(gpu, verifier, [b64d(a) for a in answers])
    _Responder.answers.clear()
    with pytest.raises(EvidenceError, match="answered 404"):
        fetch_ocsp(pem(*gpu.chain), responder)
