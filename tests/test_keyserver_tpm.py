"""End to end: a grant that requires a TPM quote with a PCR policy, a software TPM, the agent, a load;
then a PCR extend, and the next renewal is refused and the key dropped."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import modelseal.numpy
from modelseal.errors import KeyReleaseError
from modelseal.pki import identity_of_cert_file
from modelseal.release.wire import ask

from .conftest import make_tensors
from .services import Agent, KeyServer, SoftwareTpm, wait_for
from .test_keyserver import grant, sealed_model

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

PCRS = "sha256:0,7,16"


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SoftwareTpm]:
    with SoftwareTpm(tmp_path / "swtpm") as tpm:
        yield tpm


def test_tpm_pcr_policy_gates_release_and_renewal(
    renewing_keyserver: KeyServer, swtpm: SoftwareTpm, tmp_path: Path
) -> None:
    server = renewing_keyserver
    enrolled = subprocess.run(
        [sys.executable, "-m", "modelseal", "agent", "tpm-enroll", "--tcti", swtpm.tcti, "--pcrs", PCRS, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    requirement = json.loads(enrolled.stdout)["requirement"]
    sealed = sealed_model(server, tmp_path)
    cert = server.host_cert("tpm-host")
    spki = identity_of_cert_file(cert[0]).spki

    # A TPM requirement that does not pin the AK is refused when the grant is made.
    with pytest.raises(Exception, match="must pin the host's attestation key"):
        grant(server, "demo", spki, evidence=[{"kind": "tpm", "measurements": {"pcr.sha256.16": "00" * 32}}])
    grant(server, "demo", spki, evidence=[requirement])

    tables = {"tpm": {"tcti": swtpm.tcti, "pcrs": PCRS}}
    mtls_only = Agent(server, cert, tmp_path).start()  # same host identity, but presents no TPM quote
    agent = Agent(server, cert, tmp_path, tables=tables, evidence=["mtls", "tpm"]).start()
    try:
        with pytest.raises(KeyReleaseError) as missing:
            modelseal.numpy.load_file(sealed, identity=f"agent:{mtls_only.socket}")
        assert missing.value.code == "evidence_required"

        loaded = modelseal.numpy.load_file(sealed, identity=f"agent:{agent.socket}")
        for name, value in make_tensors().items():
            np.testing.assert_array_equal(loaded[name], value)

        swtpm.extend(16)  # the host now runs something the owner did not approve
        wait_for(lambda: ask(agent.socket, {"op": "status"})[0]["keys"] == [], 15, "the agent to drop the key")
        dropped = ask(agent.socket, {"op": "status"})[0]["dropped"]
        (reason,) = dropped.values()
        assert reason["code"] == "evidence_rejected" and "pcr.sha256.16" in reason["message"]
        with pytest.raises(KeyReleaseError) as refused:
            modelseal.numpy.load_file(sealed, identity=f"agent:{agent.socket}")
        assert refused.value.code == "evidence_rejected"
    finally:
        agent.stop()
        mtls_only.stop()
    with server.admin() as admin:
        entries = [json.loads(e["entry"]) for e in admin.call("GET", "/v1/admin/audit")["entries"]]
    releases = [e for e in entries if e["event"] == "release"]
    granted = [e for e in releases if e["decision"] == "ok"]
    assert granted and all(e["attested"]["tpm"] == requirement["measurements"] for e in granted)
    codes = {e.get("code") for e in releases}
    assert {"evidence_rejected", "evidence_required"} <= codes
