"""Every built-in verifier, registered on import, and their configuration from the key service's file.

``[attestation]`` in ``keyserver.toml``::

    snp_ark_sha256 = {"<sha256 of an ARK's DER>" = "Genoa"}   # more AMD roots to trust besides Milan's
    dcap_root_ca = "intel-root.der"                            # replace dcap-qvl's pinned Intel root CA
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelseal.attest import dcap, mtls, snp, tpm
from modelseal.attest.base import register_verifier
from modelseal.errors import UsageError

__all__ = ["dcap", "load_verifiers", "mtls", "snp", "tpm"]


def load_verifiers(config: dict[str, Any], base: Path | None = None) -> None:
    """(Re)register the verifiers that take settings, from an ``[attestation]`` table."""
    unknown = set(config) - {"snp_ark_sha256", "dcap_root_ca"}
    if unknown:
        raise UsageError(f"[attestation] has unknown setting(s) {sorted(unknown)}")
    arks = config.get("snp_ark_sha256", {})
    if not isinstance(arks, dict) or not all(isinstance(v, str) for v in arks.values()):
        raise UsageError("[attestation] snp_ark_sha256 must map SHA-256 fingerprints to product names")
    register_verifier(snp.SnpVerifier({k.lower().replace(":", ""): v for k, v in arks.items()}))
    root = config.get("dcap_root_ca")
    der = None
    if root is not None:
        path = (base or Path()) / str(root)
        try:
            der = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"[attestation] dcap_root_ca: cannot read {path}: {exc.strerror}") from None
    for kind in ("sgx", "tdx"):
        register_verifier(dcap.DcapVerifier(kind, der))
