"""modelseal: ship model weights encrypted, load them straight into memory at full speed.

The top-level API mirrors ``safetensors`` so that most code changes one import::

    import modelseal
    modelseal.seal("model.safetensors", "model.sealed.safetensors", ["x25519:..."])
    with modelseal.safe_open("model.sealed.safetensors", "pt", identity="host.key") as f:
        w = f.get_tensor("weight")

Framework loaders live in ``modelseal.torch``, ``modelseal.numpy``, ``modelseal.onnx``, ``modelseal.tensorflow`` and
``modelseal.transformers``; errors in ``modelseal.errors``.
"""

import os

# Before any runtime import, in every entry point (they all import this package first): ONNX Runtime
# otherwise writes a telemetry database and device id under ~/.cache/Microsoft when it is imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


from modelseal.crypto.signing import Signer
from modelseal.errors import (
    AuthenticationError,
    FormatError,
    ModelsealError,
    NoMatchingIdentityError,
    SignatureError,
)
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
from modelseal.version import __version__

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
