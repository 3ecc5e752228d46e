"""modelseal: ship model weights encrypted, load them straight into memory at full speed.

The top-level API mirrors ``safetensors`` so that most code changes one import::

    import modelseal
    modelseal.seal("model.safetensors", "model.sealed.safetensors", ["x25519:..."])
    with modelseal.safe_open("model.sealed.safetensors", "pt", identity="host.key") as f:
        w = f.get_tensor("weight")

Framework loaders live in ``modelseal.torch``, ``modelseal.numpy``, ``modelseal.onnx``, ``modelseal.tensorflow`` and
``modelseal.transformers``; errors in ``modelseal.errors``.

The names below are imported on first use (PEP 562), not with the package: every entry point imports
this package first, and a process that only loads weights (``modelseal.torch``) should not pay for
importing the sealing pipeline, every recipient kind and the signing code at start-up.
"""

import os
from typing import TYPE_CHECKING, Any

# Before any runtime import, in every entry point (they all import this package first): ONNX Runtime
# otherwise writes a telemetry database and device id under ~/.cache/Microsoft when it is imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


from modelseal.errors import (
    AuthenticationError,
    FormatError,
    ModelsealError,
    NoMatchingIdentityError,
    SignatureError,
)
from modelseal.version import __version__

if TYPE_CHECKING:
    from modelseal.crypto.signing import Signer
    from modelseal.load.artifacts import open_artifact
    from modelseal.load.bundles import open_bundle, read_bytes
    from modelseal.load.tensors import safe_open
    from modelseal.recipients import load_identity, parse_recipient
    from modelseal.recipients.hpke import KEMS as KEMS  # public since 0.1 (not in __all__): kept for existing code
    from modelseal.recipients.hpke import HpkeIdentity as HpkeIdentity  # likewise
    from modelseal.recipients.hpke import generate_identity
    from modelseal.recipients.passphrase import Passphrase
    from modelseal.recipients.symmetric import SymmetricKey
    from modelseal.sealing.writer import seal

_LAZY = {
    "Signer": "modelseal.crypto.signing",
    "open_artifact": "modelseal.load.artifacts",
    "open_bundle": "modelseal.load.bundles",
    "read_bytes": "modelseal.load.bundles",
    "safe_open": "modelseal.load.tensors",
    "load_identity": "modelseal.recipients",
    "parse_recipient": "modelseal.recipients",
    "KEMS": "modelseal.recipients.hpke",
    "HpkeIdentity": "modelseal.recipients.hpke",
    "generate_identity": "modelseal.recipients.hpke",
    "Passphrase": "modelseal.recipients.passphrase",
    "SymmetricKey": "modelseal.recipients.symmetric",
    "seal": "modelseal.sealing.writer",
}
# Submodules that ``import modelseal`` used to import as a side effect, so that ``modelseal.recipients.passphrase``
# worked after a bare ``import modelseal``: asking for one imports it with the modules above that lie in it.
_SUBMODULES = frozenset(
    ("atomicfile", "crypto", "encoding", "format", "jsonlimits", "keyfile", "load", "memory", "recipients", "sealing")
)


def __getattr__(name: str) -> Any:
    """Import a public name (or a formerly eager submodule) on first use, then keep it as an attribute."""
    from importlib import import_module

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(module), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # also reached from ``from modelseal import atomicfile`` inside an import: no more
        found = import_module(f"{__name__}.{name}")
        for inside in dict.fromkeys(m for m in _LAZY.values() if m.startswith(f"{__name__}.{name}.")):
            import_module(inside)
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "AuthenticationError",
    "FormatError",
    "ModelsealError",
    "NoMatchingIdentityError",
    "Passphrase",
    "SignatureError",
    "Signer",
    "SymmetricKey",
    "__version__",
    "generate_identity",
    "load_identity",
    "open_artifact",
    "open_bundle",
    "parse_recipient",
    "read_bytes",
    "safe_open",
    "seal",
]
