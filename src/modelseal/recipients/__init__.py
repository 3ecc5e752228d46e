"""Who can unwrap an artifact's data key.

A *recipient* wraps a data key into a JSON stanza stored in the artifact's header; an *identity*
unwraps the stanzas meant for it. These two small interfaces are all the format knows, so new kinds
(the key service, a KMS) are added by one module and one registration (:mod:`.registry`), without
touching the format.
"""

from modelseal.recipients.base import Identity, Recipient
from modelseal.recipients.registry import (
    Registry,
    load_identity,
    parse_identities,
    parse_recipient,
    register_kind,
    register_scheme,
)

__all__ = [
    "Identity",
    "Recipient",
    "Registry",
    "load_identity",
    "parse_identities",
    "parse_recipient",
    "register_kind",
    "register_scheme",
]
