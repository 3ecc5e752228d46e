"""What attestation costs: evidence verification per kind, TPM quote collection, and a full key release
with a TPM quote against a plain mTLS-only release from the same key service, in the same run.

- Verification: the SGX, TDX, SEV-SNP and NVIDIA Hopper public samples (tests/data/attestation, at their
  fixed times; the GPU with its driver and VBIOS RIMs: the first verification checks the RIMs' signatures
  and the chain, later ones find them remembered) and a TPM quote made by a
  software TPM (swtpm), each verified N times in process; medians and p99.
- Collection: `tpm2_quote` through tpm2-tools against swtpm (what the agent does per release).
- Release: a real `modelseal keyserver` on loopback, one keep-alive mTLS client, N sequential releases of a
  key whose grant needs only mTLS (the baseline) and of one whose grant needs a TPM quote with a PCR policy
  (collection + verification included). Ratio = attested median / plain median.

    python bench/attest.py [--rounds 200] [--json]

Needs swtpm and tpm2-tools (scripts/test.sh installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from samples import AT, NVIDIA_AT, NVIDIA_RIMS, SNP_AT, dcap_evidence, nvidia_evidence, snp_evidence

from modelseal.attest import VerificationContext, certchain, get_verifier, verifiers_from_config
from modelseal.attest.tpm import TpmCollector
from modelseal.attest.tpm_tools import enroll
from modelseal.devstack import KeyServer, SoftwareTpm
from modelseal.encoding import b64d, b64e
from modelseal.pki import client_context, identity_of_cert_file
from modelseal.release.protocol import EphemeralKey, binding, load_service_public_key

PCRS = "sha256:0,7,16"


def timed(fn: Any, rounds: int) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p99_ms": samples[min(len(samples) - 1, int(0.99 * len(samples)))]}


def verification(tpm_evidence: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    cases = {
        "sgx": (dcap_evidence("sgx_quote"), AT["sgx_quote"]),
        "tdx": (dcap_evidence("tdx_quote"), AT["tdx_quote"]),
        "sev-snp": (snp_evidence(), SNP_AT),
        "tpm": (tpm_evidence, int(time.time())),
        "nvidia-gpu": (nvidia_evidence(), NVIDIA_AT),  # per GPU: a host's GPUs are verified one after another
    }
    gpu_verifier = verifiers_from_config({"nvidia_rims": NVIDIA_RIMS})["nvidia-gpu"]
    out = {}

    def cold() -> None:  # what the first release from a new GPU model costs: nothing remembered yet
        certchain._LINKS.clear()
        verifiers_from_config({"nvidia_rims": NVIDIA_RIMS})["nvidia-gpu"].verify(
            nvidia_evidence(), VerificationContext(None, None, b"", NVIDIA_AT)
        )

    out["nvidia-gpu (cold)"] = timed(cold, max(10, rounds // 10))
    for kind, (evidence, at) in cases.items():
        verifier = gpu_verifier if kind.startswith("nvidia") else get_verifier(kind)
        assert verifier is not None
        ctx = VerificationContext(None, None, b"", at)
        out[kind] = timed(lambda v=verifier, e=evidence, c=ctx: v.verify(e, c), rounds)
    return out


async def releases(server: KeyServer, cert: tuple[str, str], key_id: str, collector: Any, rounds: int) -> list[float]:
    spki_hash = identity_of_cert_file(cert[0]).spki_hash
    service_key = load_service_public_key(server.info["lease_public_key"])
    samples = []
    async with httpx.AsyncClient(base_url=server.url, verify=client_context(server.ca, *cert), timeout=30) as client:
        for _ in range(rounds + 5):
            start = time.perf_counter()
            challenge = (await client.post("/v1/challenge", json={"key_id": key_id})).json()
            nonce, eph = b64d(challenge["nonce"]), EphemeralKey()
            evidence = [collector(binding(nonce, spki_hash, eph.public), nonce)] if collector else []
            body = {"key_id": key_id, "nonce": challenge["nonce"], "ephemeral_key": b64e(eph.public),
                    "evidence": evidence}  # fmt: skip
            answer = (await client.post("/v1/release", json=body)).json()
            _lease, dek = eph.open_release(
                answer, nonce=nonce, client_spki_hash=spki_hash, key_id=key_id, service_key=service_key
            )
            dek[:] = bytes(32)
            samples.append((time.perf_counter() - start) * 1000)
    return samples[5:]  # the first few warm up the connection and the service


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tpm = SoftwareTpm(Path(tmp) / "swtpm")
        server = KeyServer(Path(tmp) / "ks", None).start()
        try:
            requirement = enroll(tpm.tcti, pcrs=PCRS)["requirement"]
            collector = TpmCollector(tpm.tcti, pcrs=PCRS)
            tpm_evidence = collector(bytes(32), b"")
            verify = verification(tpm_evidence, args.rounds)
            collect = timed(lambda: collector(bytes(32), b""), max(20, args.rounds // 4))
            cert = server.host_cert("bench-host")
            spki = identity_of_cert_file(cert[0]).spki
            keys = {}
            with server.admin() as admin:
                for model, evidence in (("plain", []), ("attested", [requirement])):
                    admin.call("POST", "/v1/admin/models", {"model": model})
                    dek = b64e(bytes(range(32)))  # a throwaway key, only ever released in this run
                    keys[model] = admin.call("POST", "/v1/admin/keys", {"model": model, "key": dek})["key_id"]
                    admin.call("POST", "/v1/admin/grants", {"model": model, "identity": spki, "evidence": evidence})
            rounds = max(20, args.rounds // 2)
            plain = summary(asyncio.run(releases(server, cert, keys["plain"], None, rounds)))
            attested = summary(asyncio.run(releases(server, cert, keys["attested"], collector, rounds)))
        finally:
            server.stop()
            tpm.stop()
    report = {
        "verify": verify,
        "tpm_quote_collection": collect,
        "release_plain": plain,
        "release_tpm": attested,
        "ratio_tpm_vs_plain": attested["median_ms"] / plain["median_ms"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'verify':18} {'median ms':>10} {'p99 ms':>8}")
    for kind, row in verify.items():
        print(f"{kind:18} {row['median_ms']:10.2f} {row['p99_ms']:8.2f}")
    print(f"TPM quote collection (tpm2_quote via swtpm): median {collect['median_ms']:.1f} ms")
    print(f"release, mTLS only:        median {plain['median_ms']:.1f} ms, p99 {plain['p99_ms']:.1f} ms")
    print(f"release, TPM quote + PCRs: median {attested['median_ms']:.1f} ms, p99 {attested['p99_ms']:.1f} ms")
    print(f"ratio (attested / plain, medians): {report['ratio_tpm_vs_plain']:.2f}x")


if __name__ == "__main__":
    main()
