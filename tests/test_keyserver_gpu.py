"""Key release to a CPU TEE + GPU pair, end to end on loopback: a real key service configured with roots of
the test's own making (an AMD-shaped ARK for SEV-SNP, an NVIDIA-shaped device root and RIM root), a grant that
requires both ``sev-snp`` and ``nvidia-gpu`` with claims on each, and release requests over mutual TLS whose
evidence the test signs for each challenge. The same-challenge rule needs evidence bound to *this* exchange,
which the public samples cannot be (each carries its own fixed nonce); they are verified in
tests/test_nvidia_gpu.py and tests/test_attest_samples.py at their recorded bindings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelseal.encoding import b64d, b64e
from modelseal.pki import identity_of_cert_file
from modelseal.release import protocol

from .gpu_evidence import GpuUnderTestRoots, RimSignerUnderTestRoots, pem
from .services import KeyServer
from .snp_evidence import SnpUnderTestRoots
from .test_keyserver import grant, key_of, sealed_model

pytestmark = pytest.mark.slow  # real processes: the full suite, not the fast tier


class Pair:
    """One confidential VM (SEV-SNP) with one GPU, both under the test's roots."""

    def __init__(self) -> None:
        self.snp = SnpUnderTestRoots.make()
        self.gpu = GpuUnderTestRoots.make()
        self.rim_signer = RimSignerUnderTestRoots.make()

    def configure(self, server: KeyServer, directory: Path) -> None:
        directory.mkdir()
        (directory / "device-root.pem").write_text(pem(self.gpu.root))
        (directory / "rim-root.pem").write_text(pem(self.rim_signer.root))
        for name, rim in zip(("driver", "vbios"), self.rim_signer.rims_for(self.gpu), strict=True):
            (directory / f"{name}.swidtag").write_bytes(rim)
        with server.config.open("a") as config:
            config.write(
                "\n[attestation]\n"
                f'snp_ark_sha256 = {{"{self.snp.ark_sha256}" = "Test"}}\n'
                f'nvidia_device_root = "{directory / "device-root.pem"}"\n'
                f'nvidia_rim_root = "{directory / "rim-root.pem"}"\n'
                f'nvidia_rims = ["{directory}"]\n'
            )


@pytest.fixture
def pair_and_server(tmp_path: Path) -> Iterator[tuple[Pair, KeyServer]]:
    pair = Pair()
    server = KeyServer(tmp_path / "ks")
    pair.configure(server, tmp_path / "roots")
    server.start()
    try:
        yield pair, server
    finally:
        server.stop()


def release(
    client: httpx.Client, key_id: str, spki_hash: bytes, evidence: Any
) -> tuple[httpx.Response, dict[str, Any], protocol.EphemeralKey]:
    """One challenge and release; ``evidence(binding)`` builds the evidence list for this exchange."""
    challenge = client.post("/v1/challenge", json={"key_id": key_id})
    assert challenge.status_code == 200, challenge.text
    eph = protocol.EphemeralKey()
    nonce = b64d(challenge.json()["nonce"])
    bound = protocol.binding(nonce, spki_hash, eph.public)
    body = {"key_id": key_id, "nonce": b64e(nonce), "ephemeral_key": b64e(eph.public), "evidence": evidence(bound)}
    return client.post("/v1/release", json=body), body, eph


def refusal(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def test_a_grant_requiring_a_cpu_tee_and_a_gpu_is_met_only_when_both_carry_the_challenge(
    pair_and_server: tuple[Pair, KeyServer], tmp_path: Path
) -> None:
    pair, server = pair_and_server
    sealed = sealed_model(server, tmp_path)
    key_id = key_of(sealed)
    cert = server.host_cert("cvm-host")
    identity = identity_of_cert_file(cert[0])
    grant(
        server, "demo", identity.spki,
        evidence=[
            {"kind": "sev-snp", "measurements": {"measurement": "00" * 48}},
            {"kind": "nvidia-gpu", "measurements": {"driver_version": "570.86.15", "gpu_count": "1"}},
        ],
    )  # fmt: skip
    snp, gpu = pair.snp, pair.gpu
    stale = bytes(32)
    with server.host_client(cert) as client:

        def attempt(evidence: Any) -> tuple[int, str, str]:
            return refusal(release(client, key_id, identity.spki_hash, evidence)[0])

        # both parts, both bound to this challenge: released, and the lease opens
        ok, body, eph = release(client, key_id, identity.spki_hash, lambda b: [snp.evidence(b), gpu.evidence(b)])
        assert ok.status_code == 200, ok.text
        lease, dek = eph.open_release(
            ok.json(), nonce=b64d(body["nonce"]), client_spki_hash=identity.spki_hash, key_id=key_id,
            service_key=protocol.load_service_public_key(server.info["lease_public_key"]),
        )  # fmt: skip
        assert lease.model == "demo" and len(dek) == 32

        # the GPU part missing, or the CPU part missing
        assert attempt(lambda b: [snp.evidence(b)])[:2] == (403, "evidence_required")
        assert "requires nvidia-gpu evidence" in attempt(lambda b: [snp.evidence(b)])[2]
        assert attempt(lambda b: [gpu.evidence(b)])[:2] == (403, "evidence_required")

        # either part bound to another challenge
        status, code, message = attempt(lambda b: [snp.evidence(b), gpu.evidence(stale)])
        assert (status, code) == (403, "evidence_rejected") and "nvidia-gpu evidence is not bound" in message
        status, code, message = attempt(lambda b: [snp.evidence(stale), gpu.evidence(b)])
        assert (status, code) == (403, "evidence_rejected") and "sev-snp evidence is not bound" in message

        # two GPUs where the grant asks for one; a second GPU bound elsewhere; one GPU listed twice
        twin = gpu.sibling()

        def two(b: bytes, second: bytes, other: GpuUnderTestRoots = twin) -> list[Any]:
            doc = gpu.evidence(b)
            doc["gpus"] = [*doc["gpus"], *other.evidence(second)["gpus"]]  # type: ignore[misc]
            return [snp.evidence(b), doc]

        status, code, message = attempt(lambda b: two(b, b))
        assert (status, code) == (403, "evidence_rejected") and "gpu_count = 2" in message
        status, code, message = attempt(lambda b: two(b, stale))
        assert (status, code) == (403, "evidence_rejected") and "GPU 1's nonce" in message
        status, code, message = attempt(lambda b: two(b, b, gpu))
        assert (status, code) == (403, "evidence_rejected") and "GPU 1 is GPU 0 again" in message

        # a GPU whose firmware differs from the RIMs: refused, the index named
        saved = gpu.measurements[3]
        gpu.measurements[3] = bytes(48)
        try:
            status, code, message = attempt(lambda b: [snp.evidence(b), gpu.evidence(b)])
        finally:
            gpu.measurements[3] = saved
        assert (status, code) == (403, "evidence_rejected") and "measurement(s) 2 (VBIOS) differ" in message

        # evidence from a GPU whose chain is not NVIDIA's (here: not the configured device root)
        foreign = GpuUnderTestRoots.make()
        foreign.measurements = gpu.measurements
        status, code, message = attempt(lambda b: [snp.evidence(b), foreign.evidence(b)])
        assert (status, code) == (403, "evidence_rejected") and "does not end at the pinned root" in message

    with server.admin() as admin:
        entries = [json.loads(e["entry"]) for e in admin.call("GET", "/v1/admin/audit")["entries"]]
    [released] = [e for e in entries if e["event"] == "release" and e.get("code") is None]
    attested = json.dumps(released)
    assert "570.86.15" in attested and "96.00.9F.00.01" in attested, "the audit records both parts' claims"


def test_a_grant_with_claims_the_gpu_does_not_meet_names_them(
    pair_and_server: tuple[Pair, KeyServer], tmp_path: Path
) -> None:
    pair, server = pair_and_server
    sealed = sealed_model(server, tmp_path)
    cert = server.host_cert("cvm-host")
    identity = identity_of_cert_file(cert[0])
    grant(server, "demo", identity.spki, evidence=[
        {"kind": "sev-snp"}, {"kind": "nvidia-gpu", "measurements": {"driver_version": ["560.35.03", "565.57.01"]}},
    ])  # fmt: skip
    with server.host_client(cert) as client:
        response, _, _ = release(
            client, key_of(sealed), identity.spki_hash, lambda b: [pair.snp.evidence(b), pair.gpu.evidence(b)]
        )
    status, code, message = refusal(response)
    assert (status, code) == (403, "evidence_rejected")
    assert message == "device 0: nvidia-gpu measurement driver_version = 570.86.15 is not one the grant allows"
