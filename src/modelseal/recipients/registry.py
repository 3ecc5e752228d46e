"""The one registry: recipient strings, identity specs and key-file labels, mapped to their kinds.

Recipient strings: ``x25519:B64``, ``mlkem768x25519:B64``, ``symmetric:PATH``, any registered scheme
(``keyserver:URL#MODEL``), or the path of a public-key or identity file.
Identity specs: an :class:`Identity` object, a list of them, identity text itself (``MODELSEAL-IDENTITY-...``
lines, as ``keygen`` writes them), a key-file path, ``env:VAR`` (the variable holds identity text),
``passphrase-env:VAR`` (the variable holds a passphrase), ``agent:SOCKET`` (keys released by the key
service through the host agent), or any registered spec prefix. No error message repeats a value that
may be a secret.

A kind is added by one module with one registration function ``register(registry)`` that claims its
recipient schemes, identity-spec prefixes and key-file labels. modelseal's own kinds (``hpke``,
``symmetric``, ``passphrase``, ``env:``, and the key service's ``keyserver:`` and ``agent:`` in
:mod:`modelseal.release`) are listed in :data:`BUILTIN` as ``"module:function"`` strings, imported by name
so this package never imports the layers above it, and they exist without install metadata (a source
tree on ``PYTHONPATH``, a zipapp, a frozen binary). Other distributions' kinds are found through the
entry-point group :data:`ENTRY_POINT_GROUP`, after every built-in. The registry is filled once, on the
first lookup; :func:`register_kind` adds a kind from code. A name is claimed once: a later kind cannot
take over ``x25519:`` or ``agent:`` and receive the data keys meant for it.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar, Union

from modelseal.errors import KeyFileError, UsageError, one_line
from modelseal.keyfile import key_lines, read_text, shown_value
from modelseal.recipients.base import Identity, IdentitySet, Recipient

IdentitySpec = Union[Identity, str, os.PathLike, Sequence[Union[Identity, str, os.PathLike]]]  # type: ignore[type-arg]

ENTRY_POINT_GROUP = "modelseal.recipients"
"""Entry points in this group name a ``register(registry)`` function, like :data:`BUILTIN`'s."""

RecipientFactory = Callable[[str], Recipient]
SpecFactory = Callable[[str], Union[Identity, list[Identity]]]
LabelLoader = Callable[[bytes], Identity]

_T = TypeVar("_T")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_LABEL = re.compile(r"[A-Z0-9][A-Z0-9-]*")


class _ClaimError(UsageError):
    """A claim refused by :class:`Registry`: its message already names the kind that tried and the holder."""


@dataclass(frozen=True)
class Scheme:
    """A recipient-string scheme: ``PREFIX:REST`` is handed to ``factory(REST)``."""

    factory: RecipientFactory
    public_key: bool  # REST is the public key itself: the line may also stand in a key file


@dataclass(frozen=True)
class Label:
    """A key-file label: a ``LABEL:BASE64`` line is handed to ``loader(raw)``."""

    loader: LabelLoader
    raw_size: int | None  # the key may also be a binary file of exactly this many raw bytes


@dataclass
class Registry:
    """What the strings and key files of every registered kind mean."""

    schemes: dict[str, Scheme] = field(default_factory=dict)
    specs: dict[str, SpecFactory] = field(default_factory=dict)
    labels: dict[str, Label] = field(default_factory=dict)
    source: str = "modelseal"  # the kind being registered, named in a conflict
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (what, name) -> the kind that claimed it

    def scheme(self, prefix: str, factory: RecipientFactory, *, public_key: bool = False) -> None:
        """Claim the recipient string ``PREFIX:...`` (``public_key``: ``PREFIX:KEY`` lines in key files too)."""
        self._claim(self.schemes, "recipient scheme", prefix, _PREFIX, Scheme(factory, public_key))

    def spec(self, prefix: str, factory: SpecFactory) -> None:
        """Claim the identity spec ``PREFIX:...``; ``factory`` gets what follows the colon."""
        self._claim(self.specs, "identity spec", prefix, _PREFIX, factory)

    def label(self, label: str, loader: LabelLoader, *, raw_size: int | None = None) -> None:
        """Claim the key-file line ``LABEL:BASE64``; ``loader`` gets the decoded key bytes."""
        self._claim(self.labels, "key-file label", label, _LABEL, Label(loader, raw_size))

    def _claim(self, table: dict[str, _T], what: str, name: str, pattern: re.Pattern[str], value: _T) -> None:
        if not pattern.fullmatch(name):
            raise _ClaimError(f"{self.source}: {name!r} is not a valid {what} name")
        if name in table and table[name] != value:
            held = f"the {what} {name!r} is already registered by {self.owners[what, name]}"
            raise _ClaimError(f"{self.source}: {held} (a name has one kind)")
        table[name] = value
        self.owners.setdefault((what, name), self.source)


def _register_env(registry: Registry) -> None:
    """``env:VAR``: the variable holds identity text (the key itself, as ``keygen`` writes it)."""

    def from_env(var: str) -> list[Identity]:
        value = os.environ.get(var)
        if not value:
            raise UsageError(f"environment variable {var} is not set or empty (it should hold an identity)")
        return identities_from_text(value, f"${var}")

    registry.spec("env", from_env)


Hook = Callable[[Registry], None]

BUILTIN: tuple[str, ...] = (
    "modelseal.recipients.hpke:register",
    "modelseal.recipients.symmetric:register",
    "modelseal.recipients.passphrase:register",
    "modelseal.recipients.registry:_register_env",
    "modelseal.release.recipient:register",  # keyserver:URL#MODEL
    "modelseal.release.identity:register",  # agent:SOCKET
)
"""The kinds that ship with modelseal, as ``module:function``: imported by name (no import edge from this
package to :mod:`modelseal.release`) and registered, in this order, before any entry point."""

_lock = threading.RLock()
_registry: Registry | None = None
_plugins_loaded = False


def _apply(registry: Registry, hook: Hook, source: str) -> None:
    registry.source = source
    try:
        hook(registry)
    finally:
        registry.source = "modelseal"


def _builtins() -> Registry:
    """The registry with modelseal's own kinds (:data:`BUILTIN`); plugins join it when first needed."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                registry = Registry()
                for target in BUILTIN:
                    module, _, attr = target.partition(":")
                    _apply(registry, getattr(importlib.import_module(module), attr), target)
                _registry = registry
    return _registry


def _load_plugins(registry: Registry) -> None:
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        source = f"recipient plugin {ep.name} ({ep.value})"
        try:
            hook = ep.load()
        except Exception as exc:  # a broken plugin is named, in one line, instead of a traceback
            raise UsageError(f"{source} cannot be loaded: {one_line(exc)}") from None
        try:
            _apply(registry, hook, source)
        except _ClaimError:  # already one line naming the plugin and the kind holding the name
            raise
        except Exception as exc:
            raise UsageError(f"{source} cannot register: {one_line(exc)}") from None


def get_registry() -> Registry:
    """Every kind: :data:`BUILTIN`, then the installed plugins (the entry points, read once).

    Lookups ask the built-in kinds first and read the entry points only for a name they do not hold
    (reading every installed distribution's metadata costs milliseconds a small load should not pay);
    a plugin can never take a built-in name, whether it is read early or late.
    """
    global _plugins_loaded
    registry = _builtins()
    if not _plugins_loaded:
        with _lock:
            if not _plugins_loaded:
                _load_plugins(registry)
                _plugins_loaded = True
    return registry


def _find(table: Callable[[Registry], dict[str, _T]], name: str) -> _T | None:
    """``name`` in a table of the built-in kinds, else (reading the plugins) of every kind."""
    found = table(_builtins()).get(name)
    return found if found is not None else table(get_registry()).get(name)


def register_kind(hook: Hook, source: str | None = None) -> None:
    """Add a kind from code: ``hook(registry)`` claims its schemes, specs and labels.

    The same function an entry point names; use it where installing a distribution is not possible.
    """
    with _lock:
        _apply(get_registry(), hook, source or str(getattr(hook, "__qualname__", hook)))


def register_scheme(prefix: str, factory: RecipientFactory) -> None:
    """Teach :func:`parse_recipient` a new ``prefix:...`` recipient string (one-line :func:`register_kind`)."""
    register_kind(lambda r: r.scheme(prefix, factory), f"scheme {prefix}:")


def reset() -> None:
    """Forget every registration; the next lookup fills the registry again (for tests of plugins)."""
    global _registry, _plugins_loaded
    with _lock:
        _registry, _plugins_loaded = None, False


def scheme(prefix: str) -> RecipientFactory | None:
    found = _find(lambda r: r.schemes, prefix)
    return found.factory if found else None


def known_schemes() -> list[str]:
    return sorted(get_registry().schemes)


def parse_recipient(text: str) -> Recipient:
    """Parse one recipient string (see module docstring)."""
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    factory = scheme(prefix) if sep else None
    if factory is not None:
        return factory(rest)
    if os.path.isfile(text):
        return _recipient_from_file(text)
    expected = ", ".join(s + ":..." for s in known_schemes())
    raise KeyFileError(
        f"unrecognised recipient {shown_value(text)}: expected one of {expected}, "
        "or the path of a public-key or identity file"
    )


def _recipient_from_file(path: str) -> Recipient:
    """A public-key file's ``x25519:...`` line, an identity file's ``# recipient:`` comment, or a key
    that is its own recipient (a symmetric key file)."""
    reg = get_registry()
    text = read_text(path)
    for line in text.splitlines():
        line = line.strip().removeprefix("# recipient: ")
        found = reg.schemes.get(line.partition(":")[0])
        if found is not None and found.public_key and not line.startswith("#"):
            return parse_recipient(line)
    for label, entry in reg.labels.items():
        if label in text:
            for name, raw in key_lines(text, path):
                key = entry.loader(raw) if name == label else None
                if isinstance(key, Recipient):
                    return key
    raise KeyFileError(f"{path} holds no recipient (expected a line like x25519:BASE64)")


def identities_from_text(text: str, source: str) -> list[Identity]:
    """Parse identity-file text (one or more identity lines)."""
    lines = key_lines(text, source)
    labels = _builtins().labels
    if not all(label in labels for label, _raw in lines):
        labels = get_registry().labels  # a line no built-in kind reads: perhaps a plugin's
    out = [labels[label].loader(raw) for label, raw in lines if label in labels]
    if not out:
        raise KeyFileError(f"{source} holds no identity (make one with `modelseal keygen`)")
    return out


def parse_identities(spec: IdentitySpec, origin: str | None = None) -> list[Identity]:
    """Resolve an identity spec to a list of identities (see module docstring).

    ``origin`` names where a string spec came from (``$MODELSEAL_IDENTITY``): errors then name the
    origin and never repeat the value, which may be a secret.
    """
    if isinstance(spec, Identity):
        return [spec]
    if isinstance(spec, (str, os.PathLike)):
        return _from_string(os.fspath(spec), origin)
    if isinstance(spec, Sequence):
        out: list[Identity] = []
        for item in spec:
            out.extend(parse_identities(item, origin))
        return out
    raise UsageError(
        f"identity must be an Identity, a key-file path, env:VAR or a list of them, not {type(spec).__name__}"
    )


def _from_string(text: str, origin: str | None) -> list[Identity]:
    if is_identity_text(text):  # the key itself, pasted into -i, identity= or $MODELSEAL_IDENTITY
        return identities_from_text(text, origin or "the identity text given")
    prefix, sep, rest = text.partition(":")
    factory = _find(lambda r: r.specs, prefix) if sep else None
    if factory is not None:
        found = factory(rest)
        return found if isinstance(found, list) else [found]
    shown = origin or f"identity file {shown_value(text)}"
    if sep and not os.path.exists(text) and scheme(prefix) is not None:
        given = origin or shown_value(text)
        raise UsageError(f"{given} is a recipient, not an identity; pass the matching key file")
    try:
        raw = Path(text).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {shown}: {exc.strerror}") from None
    if not raw.isascii():
        for registry in (_builtins, get_registry):
            for entry in registry().labels.values():
                if entry.raw_size == len(raw):
                    return [entry.loader(raw)]
    try:
        contents = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{shown} is not a modelseal key file (not text)") from None
    return identities_from_text(contents, shown)


def is_identity_text(text: str) -> bool:
    """Whether ``text`` is identity-file text (a ``MODELSEAL-...:BASE64`` line) rather than a spec or path."""
    heads = [head for head, sep, _ in (line.strip().partition(":") for line in text.splitlines()) if sep]
    if any(head in _builtins().labels for head in heads):
        return True
    if not any(_LABEL.fullmatch(head) for head in heads):  # nothing a plugin's label could be (a path, env:X)
        return False
    return any(head in get_registry().labels for head in heads)


def load_identity(spec: IdentitySpec, origin: str | None = None) -> Identity:
    """Load an identity (or several, combined) from a key file, ``env:VAR``, identity text or objects."""
    ids = parse_identities(spec, origin)
    return ids[0] if len(ids) == 1 else IdentitySet(ids)
