"""Legacy: the key service's configuration of the verifiers, as it was before the registry.

Delete this module once ``modelseal.keyserver`` builds its verifiers with
:func:`modelseal.attest.verifiers_from_config` and passes them along (nothing else imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelseal.attest.registry import legacy_override, verifiers_from_config


def load_verifiers(config: dict[str, Any], base: Path | None = None) -> None:
    """Configure every verifier from an ``[attestation]`` table and make :func:`get_verifier` return them."""
    for verifier in verifiers_from_config(config, base).values():
        legacy_override(verifier)
