"""The ``keyserver`` recipient: the key service keeps the data key; the file carries only its key id.

``-r keyserver:https://keys.example:8443#MODEL`` registers the data key with the key service's admin
API (token from ``$MODELSEAL_ADMIN_TOKEN`` or ``$MODELSEAL_ADMIN_TOKEN_FILE``, CA from
``$MODELSEAL_KEYSERVER_CA``) and writes the stanza ``{"type": "keyserver", "url", "model", "key_id"}``.
Hosts unwrap it through their agent (``identity="agent:/run/modelseal/agent.sock"``).
"""

from __future__ import annotations

import hashlib

from modelseal.encoding import b64e
from modelseal.errors import KeyFileError
from modelseal.recipients.base import Stanza
from modelseal.recipients.registry import Registry

TYPE = "keyserver"


class KeyserverRecipient:
    def __init__(self, url: str, model: str, *, token: str | None = None, ca: str | None = None) -> None:
        if not url.startswith("https://"):
            raise KeyFileError(f"keyserver recipient URL must start with https:// (got {url[:60]!r})")
        if not model:
            raise KeyFileError("keyserver recipient needs a model: keyserver:https://HOST:PORT#MODEL")
        self.url, self.model = url.rstrip("/"), model
        self._token, self._ca = token, ca  # default: from the environment (module docstring)
        self._registered: dict[str, str] = {}  # fingerprint of a data key -> its key id (one process)

    @classmethod
    def parse(cls, text: str) -> KeyserverRecipient:
        url, _, model = text.partition("#")
        return cls(url, model)

    def describe(self) -> str:
        return f"keyserver:{self.url}#{self.model}"

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        from modelseal.release.client import AdminClient

        fingerprint = b64e(hashlib.sha256(b"modelseal/1 registered" + bytes(dek)).digest())
        key_id = self._registered.get(fingerprint)
        if key_id is None:
            with AdminClient(self.url, token=self._token, ca=self._ca) as client:
                key_id = self._registered[fingerprint] = client.register_key(self.model, dek)
        return {"type": TYPE, "url": self.url, "model": self.model, "key_id": key_id}


def register(registry: Registry) -> None:
    """The ``keyserver:URL#MODEL`` recipient scheme (listed in :data:`modelseal.recipients.registry.BUILTIN`)."""
    registry.scheme(TYPE, KeyserverRecipient.parse)
