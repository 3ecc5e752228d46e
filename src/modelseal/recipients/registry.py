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
first lookup that needs them; :func:`register_kind` adds a kind from code. A name is claimed once, and
claims are compared by identity, never with a plugin's ``__eq__``: a later kind cannot take over
``x25519:`` or ``agent:`` and receive the data keys meant for it.

Precedence: a built-in scheme or spec prefix, then an existing file, then a plugin's prefix. So what
worked before plugins existed (``-r host.pub``, ``-i dir:x/host.key``) never reads them, and a broken
plugin breaks only the lookups that need one (each repeats its one-line error). What a plugin's factory
or loader hands back is checked to be a :class:`Recipient` / :class:`Identity`.
"""

from __future__ import annotations

import os
import pkgutil
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MethodType
from typing import TypeVar, Union

from modelseal.errors import KeyFileError, UsageError, one_line
from modelseal.keyfile import key_lines, read_bytes, read_text, shown_value
from modelseal.recipients.base import Identity, IdentitySet, Recipient

IdentitySpec = Union[Identity, str, os.PathLike, Sequence[Union[Identity, str, os.PathLike]]]  # type: ignore[type-arg]

ENTRY_POINT_GROUP = "modelseal.recipients"
"""Entry points in this group name a ``register(registry)`` function, like :data:`BUILTIN`'s."""

RecipientFactory = Callable[[str], Recipient]
SpecFactory = Callable[[str], Union[Identity, list[Identity]]]
LabelLoader = Callable[[bytes], Identity]

_T = TypeVar("_T")
_E = TypeVar("_E", "Scheme", "Spec", "Label")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_LABEL = re.compile(r"[A-Z0-9][A-Z0-9-]*")


class _ClaimError(UsageError):
    """A claim refused by :class:`Registry`: its message already names the kind that tried and the holder."""


@dataclass(frozen=True)
class Scheme:
    """A recipient-string scheme: ``PREFIX:REST`` is handed to ``factory(REST)``."""

    factory: RecipientFactory
    public_key: bool  # REST is the public key itself: the line may also stand in a key file
    source: str = "modelseal"  # the kind that claimed it, named when it hands back the wrong thing

    def same(self, other: Scheme) -> bool:
        return _same(self.factory, other.factory) and self.public_key is other.public_key


@dataclass(frozen=True)
class Spec:
    """An identity spec: ``PREFIX:REST`` is handed to ``factory(REST)``."""

    factory: SpecFactory
    source: str = "modelseal"

    def same(self, other: Spec) -> bool:
        return _same(self.factory, other.factory)


@dataclass(frozen=True)
class Label:
    """A key-file label: a ``LABEL:BASE64`` line is handed to ``loader(raw)``."""

    loader: LabelLoader
    raw_size: int | None  # the key may also be a binary file of exactly this many raw bytes
    source: str = "modelseal"

    def same(self, other: Label) -> bool:
        return _same(self.loader, other.loader) and self.raw_size == other.raw_size  # int or None, checked


def _same(a: object, b: object) -> bool:
    """Whether two registered callables are one registration: by identity only (a plugin's object may
    define ``__eq__`` to equal anything), a bound method by its function and instance."""
    if a is b:
        return True
    if isinstance(a, MethodType) and isinstance(b, MethodType):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return False


@dataclass
class Registry:
    """What the strings and key files of every registered kind mean."""

    schemes: dict[str, Scheme] = field(default_factory=dict)
    specs: dict[str, Spec] = field(default_factory=dict)
    labels: dict[str, Label] = field(default_factory=dict)
    source: str = "modelseal"  # the kind being registered, named in a conflict

    def scheme(self, prefix: str, factory: RecipientFactory, *, public_key: bool = False) -> None:
        """Claim the recipient string ``PREFIX:...`` (``public_key``: ``PREFIX:KEY`` lines in key files too)."""
        self._claim(self.schemes, "recipient scheme", prefix, _PREFIX, Scheme(factory, bool(public_key), self.source))

    def spec(self, prefix: str, factory: SpecFactory) -> None:
        """Claim the identity spec ``PREFIX:...``; ``factory`` gets what follows the colon."""
        self._claim(self.specs, "identity spec", prefix, _PREFIX, Spec(factory, self.source))

    def label(self, label: str, loader: LabelLoader, *, raw_size: int | None = None) -> None:
        """Claim the key-file line ``LABEL:BASE64``; ``loader`` gets the decoded key bytes."""
        if raw_size is not None and (type(raw_size) is not int or raw_size <= 0):
            raise _ClaimError(f"{self.source}: a key-file label's raw_size must be a positive int or None")
        self._claim(self.labels, "key-file label", label, _LABEL, Label(loader, raw_size, self.source))

    def copy(self) -> Registry:
        """Another registry holding the same claims, to fill and publish only if every claim succeeds."""
        return Registry(dict(self.schemes), dict(self.specs), dict(self.labels))

    def _claim(self, table: dict[str, _E], what: str, name: str, pattern: re.Pattern[str], entry: _E) -> None:
        """Claim ``name`` once. Nothing a plugin hands over is compared with ``==``: the name must be an
        exact ``str``, and a second claim is accepted only as the identical registration (the same
        callable object, see :func:`_same`)."""
        if type(name) is not str:
            raise _ClaimError(f"{self.source}: a {what} name must be a str, not {type(name).__name__}")
        if not pattern.fullmatch(name):
            raise _ClaimError(f"{self.source}: {name!r} is not a valid {what} name")
        held = table.get(name)
        if held is not None:
            if held.same(entry):
                return
            claimed = f"the {what} {name!r} is already registered by {held.source}"
            raise _ClaimError(f"{self.source}: {claimed} (a name has one kind)")
        table[name] = entry


def _shown(value: object) -> str:
    return "None" if value is None else f"a value of type {type(value).__name__}"


def _recipient(found: object, entry: Scheme, prefix: str) -> Recipient:
    """What a scheme's factory made, if it is a recipient; otherwise one line naming the kind."""
    if not isinstance(found, Recipient):
        raise UsageError(f"{entry.source}: the recipient scheme {prefix!r} returned {_shown(found)}, not a Recipient")
    return found


def _identity(found: object, source: str, what: str) -> Identity:
    """What a spec factory or label loader made, if it is an identity; otherwise one line naming the kind."""
    if not isinstance(found, Identity):
        raise UsageError(f"{source}: the {what} returned {_shown(found)}, not an Identity")
    return found


def _spec_identities(entry: Spec, prefix: str, rest: str) -> list[Identity]:
    found = entry.factory(rest)
    what = f"identity spec {prefix!r}"
    if isinstance(found, list):
        for item in found:
            if not isinstance(item, Identity):
                raise UsageError(f"{entry.source}: the {what} returned a list holding {_shown(item)}, not an Identity")
        return found
    return [_identity(found, entry.source, what)]


def _label_identity(entry: Label, label: str, raw: bytes) -> Identity:
    return _identity(entry.loader(raw), entry.source, f"key-file label {label!r}")


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
_builtin: Registry | None = None  # modelseal's own kinds: never waits on (or breaks with) a plugin
_full: Registry | None = None  # the built-ins, the plugins and register_kind's: published once complete
_loading: Registry | None = None  # being filled by the plugins now (what a plugin asking the registry sees)
_failure: str | None = None  # the one line of the plugin that failed: said again on every later lookup


def _apply(registry: Registry, hook: Hook, source: str) -> None:
    registry.source = source
    try:
        hook(registry)
    finally:
        registry.source = "modelseal"


def _builtins() -> Registry:
    """The registry with modelseal's own kinds (:data:`BUILTIN`); plugins join a copy of it when needed."""
    global _builtin
    if _builtin is None:
        with _lock:
            if _builtin is None:
                registry = Registry()
                for target in BUILTIN:
                    _apply(registry, pkgutil.resolve_name(target), target)
                _builtin = registry
    return _builtin


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
    a plugin can never take a built-in name, whether it is read early or late. The plugins fill a copy
    of the built-ins, published only when all of them registered: after a failure nothing is
    half-registered, and every later call raises the same one-line error (built-in lookups keep
    working). A plugin asking the registry while it registers gets the kinds registered so far.
    """
    global _full, _loading, _failure
    if _full is not None:
        return _full
    with _lock:
        if _full is not None:
            return _full
        if _loading is not None:  # a plugin's register() asking (this thread holds the lock): no recursion
            return _loading
        if _failure is not None:
            raise UsageError(_failure)
        registry = _builtins().copy()
        _loading = registry
        try:
            _load_plugins(registry)
        except UsageError as exc:
            _failure = str(exc)
            raise UsageError(_failure) from None
        finally:
            _loading = None
        _full = registry
        return registry


def _find(table: Callable[[Registry], dict[str, _T]], name: str) -> _T | None:
    """``name`` in a table of the built-in kinds, else (reading the plugins) of every kind."""
    found = table(_builtins()).get(name)
    return found if found is not None else table(get_registry()).get(name)


def register_kind(hook: Hook, source: str | None = None) -> None:
    """Add a kind from code: ``hook(registry)`` claims its schemes, specs and labels, all or none.

    The same function an entry point names; use it where installing a distribution is not possible.
    """
    global _full, _loading
    with _lock:
        current = get_registry()
        trial = current.copy()
        _apply(trial, hook, source or str(getattr(hook, "__qualname__", hook)))
        if current is _loading:  # called by a plugin while the plugins load: join what they fill
            current.schemes, current.specs, current.labels = trial.schemes, trial.specs, trial.labels
        else:
            _full = trial


def register_scheme(prefix: str, factory: RecipientFactory) -> None:
    """Teach :func:`parse_recipient` a new ``prefix:...`` recipient string (one-line :func:`register_kind`)."""
    register_kind(lambda r: r.scheme(prefix, factory), f"scheme {prefix}:")


def reset() -> None:
    """Forget every registration and plugin failure; the next lookup fills the registry again (for tests)."""
    global _builtin, _full, _loading, _failure
    with _lock:
        _builtin = _full = _loading = None
        _failure = None


def scheme(prefix: str) -> RecipientFactory | None:
    found = _find(lambda r: r.schemes, prefix)
    return found.factory if found else None


def known_schemes() -> list[str]:
    return sorted(get_registry().schemes)


def parse_recipient(text: str) -> Recipient:
    """Parse one recipient string (see module docstring).

    A built-in scheme wins over a file of that name; a file wins over the plugins (a path such as
    ``dir:x/host.pub`` works, even with a broken plugin installed).
    """
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    found = _builtins().schemes.get(prefix) if sep else None
    if found is None and os.path.isfile(text):
        return _recipient_from_file(text)
    if found is None and sep:
        found = get_registry().schemes.get(prefix)
    if found is not None:
        return _recipient(found.factory(rest), found, prefix)
    expected = ", ".join(s + ":..." for s in known_schemes())
    raise KeyFileError(
        f"unrecognised recipient {shown_value(text)}: expected one of {expected}, "
        "or the path of a public-key or identity file"
    )


def _recipient_from_file(path: str) -> Recipient:
    """A public-key file's ``x25519:...`` line, an identity file's ``# recipient:`` comment, or a key
    that is its own recipient (a symmetric key file). The built-in kinds are asked first: the plugins
    are read only for a file none of them understands."""
    text = read_text(path)
    for registry in (_builtins, get_registry):
        found = _recipient_in(registry(), text, path)
        if found is not None:
            return found
    raise KeyFileError(f"{path} holds no recipient (expected a line like x25519:BASE64)")


def _recipient_in(reg: Registry, text: str, path: str) -> Recipient | None:
    for line in text.splitlines():
        line = line.strip().removeprefix("# recipient: ")
        found = reg.schemes.get(line.partition(":")[0])
        if found is not None and found.public_key and not line.startswith("#"):
            return parse_recipient(line)
    for label, entry in reg.labels.items():
        if label in text:
            for name, raw in key_lines(text, path):
                key = _label_identity(entry, label, raw) if name == label else None
                if isinstance(key, Recipient):
                    return key
    return None


def identities_from_text(text: str, source: str) -> list[Identity]:
    """Parse identity-file text (one or more identity lines)."""
    lines = key_lines(text, source)
    labels = _builtins().labels
    if not all(label in labels for label, _raw in lines):
        labels = get_registry().labels  # a line no built-in kind reads: perhaps a plugin's
    out = [_label_identity(labels[label], label, raw) for label, raw in lines if label in labels]
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
    """A built-in spec (``env:``, ``agent:``...) means that spec; then a path that exists is a key file;
    only then is an unknown prefix a plugin's spec (``dir:x/host.key`` works with a broken plugin)."""
    if is_identity_text(text):  # the key itself, pasted into -i, identity= or $MODELSEAL_IDENTITY
        return identities_from_text(text, origin or "the identity text given")
    prefix, sep, rest = text.partition(":")
    spec = _builtins().specs.get(prefix) if sep else None
    if spec is None and sep and not os.path.exists(text):
        spec = get_registry().specs.get(prefix)
    if spec is not None:
        return _spec_identities(spec, prefix, rest)
    shown = origin or f"identity file {shown_value(text)}"
    if sep and not os.path.exists(text) and scheme(prefix) is not None:
        given = origin or shown_value(text)
        raise UsageError(f"{given} is a recipient, not an identity; pass the matching key file")
    raw = read_bytes(text, shown)
    if not raw.isascii():
        for registry in (_builtins, get_registry):
            for label, entry in registry().labels.items():
                if entry.raw_size == len(raw):
                    return [_label_identity(entry, label, raw)]
    try:
        contents = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{shown} is not a modelseal key file (not text)") from None
    return identities_from_text(contents, shown)


def is_identity_text(text: str) -> bool:
    """Whether ``text`` is identity-file text (a ``MODELSEAL-...:BASE64`` line) rather than a spec or path.

    The plugins' labels are read only for text that could be one and names no existing file: a plugin's
    label ``A`` does not make the file ``A:B.key`` key text (nor a broken plugin break it)."""
    heads = [head for head, sep, _ in (line.strip().partition(":") for line in text.splitlines()) if sep]
    if any(head in _builtins().labels for head in heads):
        return True
    if not any(_LABEL.fullmatch(head) for head in heads):  # nothing a plugin's label could be (a path, env:X)
        return False
    if os.path.exists(text):
        return False
    return any(head in get_registry().labels for head in heads)


def load_identity(spec: IdentitySpec, origin: str | None = None) -> Identity:
    """Load an identity (or several, combined) from a key file, ``env:VAR``, identity text or objects."""
    ids = parse_identities(spec, origin)
    return ids[0] if len(ids) == 1 else IdentitySet(ids)
