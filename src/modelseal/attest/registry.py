"""The one registry of attestation kinds: each kind's verifier (key service) and collector (host agent).

A kind is one module defining an :class:`~modelseal.attest.base.AttestationKind`; it becomes known by one
registration:

- a line in :data:`BUILTIN` for the kinds shipped here;
- an entry point in the group ``modelseal.attestation`` for a kind from another distribution
  (``[project.entry-points."modelseal.attestation"]  my-tee = "my_package.my_tee:KIND"``);
- :func:`register_kind` for a program that builds its own (:func:`register_verifier`, the older API,
  for a verifier alone).

Nothing registers itself on import, and configuration never changes the registry:
:func:`verifiers_from_config` and :func:`collectors_from_config` build new objects on every call, so two
key services (or tests) in one process configured differently do not see each other's settings. A kind
cannot replace another of the same name, so an installed package cannot swap out the ``tpm`` verifier,
and two installed packages providing one name are both refused, by name.
"""

from __future__ import annotations

import pkgutil
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from modelseal.attest.base import AttestationKind, Collector, Verifier
from modelseal.errors import UsageError, one_line

ENTRY_POINT_GROUP = "modelseal.attestation"
# The built-in kinds, declared like entry points; this order is the order error messages list them in.
BUILTIN = {
    "mtls": "modelseal.attest.mtls:KIND",
    "tpm": "modelseal.attest.tpm:KIND",
    "tdx": "modelseal.attest.tdx:KIND",
    "sev-snp": "modelseal.attest.snp:KIND",
    "sgx": "modelseal.attest.sgx:KIND",
    "nvidia-gpu": "modelseal.attest.nvidia:KIND",
}


def _shown(name: object) -> str:
    """A name for a message: a plugin's own object is named by its type, never its ``repr``."""
    return repr(name) if type(name) is str else f"a {type(name).__name__}"


def _checked(name: str, obj: Any, origin: str) -> AttestationKind:
    """``obj`` if it is a kind named exactly ``name``: a plain ``str``, so no ``__eq__`` or ``__hash__`` of
    the plugin's decides which kind a name (``tpm``) means."""
    if not isinstance(obj, AttestationKind):
        raise UsageError(f"attestation kind {name!r} ({origin}) is not an AttestationKind")
    if type(obj.name) is not str or obj.name != name:
        raise UsageError(f"attestation kind {name!r} ({origin}) calls itself {_shown(obj.name)}")
    return obj


class Registry:
    """Kinds by name: the built-ins, then the entry points, read once on first use; then any
    :meth:`register`-ed. Safe to use from several threads."""

    def __init__(self) -> None:
        self._kinds: dict[str, AttestationKind] | None = None
        self._defaults: dict[str, Verifier] = {}
        self._lock = threading.RLock()

    def _loaded(self) -> dict[str, AttestationKind]:
        with self._lock:
            if self._kinds is None:
                kinds = {name: _checked(name, pkgutil.resolve_name(target), target) for name, target in BUILTIN.items()}
                origins = {name: f"modelseal ({target})" for name, target in BUILTIN.items()}
                for ep in entry_points(group=ENTRY_POINT_GROUP):
                    origin = f"entry point {ep.value} of {ep.dist.name if ep.dist else 'an unknown distribution'}"
                    plugin = f"attestation kind {ep.name!r} ({origin})"
                    if ep.name in kinds:  # a built-in, or another distribution's: neither is silently chosen
                        raise UsageError(f"{plugin} is already provided by {origins[ep.name]}")
                    try:
                        loaded = ep.load()
                    except Exception as exc:  # a broken plugin must stop start-up, with its name, in one line
                        failure = one_line(exc)
                        raise UsageError(f"{plugin} cannot be loaded: {failure}") from None
                    kinds[ep.name] = _checked(ep.name, loaded, origin)
                    origins[ep.name] = origin
                self._kinds = kinds
            return self._kinds

    def register(self, kind: AttestationKind) -> None:
        if not isinstance(kind, AttestationKind):
            raise UsageError(f"register_kind takes an AttestationKind, not {type(kind).__name__}")
        if type(kind.name) is not str:
            raise UsageError(f"an attestation kind's name is a str, not {type(kind.name).__name__}")
        kinds = self._loaded()
        with self._lock:
            if kind.name in kinds:
                raise UsageError(f"attestation kind {kind.name!r} is already registered")
            kinds[kind.name] = _checked(kind.name, kind, "register_kind")

    def get(self, name: str) -> AttestationKind | None:
        return self._loaded().get(name)

    def kinds(self) -> list[AttestationKind]:
        return list(self._loaded().values())

    def default_verifier(self, name: str) -> Verifier | None:
        """The kind's verifier with no settings (built once: verifiers keep no per-exchange state)."""
        kind = self.get(name)
        if kind is None:
            return None
        with self._lock:
            if name not in self._defaults:
                self._defaults[name] = _built(kind, {}, None)
            return self._defaults[name]


REGISTRY = Registry()


def register_kind(kind: AttestationKind) -> None:
    """Add a kind to this process's registry (an installed package uses an entry point instead)."""
    REGISTRY.register(kind)


def register_verifier(verifier: Verifier) -> None:
    """Add a kind that only verifies: the API from before kinds had collectors, kept for programs that use it.

    The key service uses ``verifier`` itself for ``verifier.kind`` (``[attestation]`` settings do not reach
    it); an agent configured to present that kind is refused at start-up, as nothing here can collect its
    evidence. Like :func:`register_kind`, it cannot replace a kind already registered. New code defines an
    :class:`~modelseal.attest.base.AttestationKind` (verifier and collector) and calls :func:`register_kind`.
    """
    name = verifier.kind

    def no_collector(table: Mapping[str, Any]) -> Collector:
        raise UsageError(
            f"evidence kind {name!r} has no collector (it was added with register_verifier, which registers "
            "only a verifier; define an AttestationKind with a collector so an agent can present it)"
        )

    register_kind(AttestationKind(name, verifier=lambda settings, base: verifier, collector=no_collector))


def known_kinds() -> list[str]:
    """Every registered kind's name, sorted."""
    return sorted(kind.name for kind in REGISTRY.kinds())


def _built(kind: AttestationKind, settings: Mapping[str, Any], base: Path | None) -> Verifier:
    verifier = kind.verifier(settings, base)
    if type(verifier.kind) is not str or verifier.kind != kind.name:  # a str compared, never the plugin's object
        raise UsageError(f"attestation kind {kind.name!r} built a verifier for {_shown(verifier.kind)}")
    return verifier


def verifiers_from_config(settings: Mapping[str, Any] | None = None, base: Path | None = None) -> dict[str, Verifier]:
    """Every registered kind's verifier, configured from the key service's ``[attestation]`` table.

    ``[attestation]`` in ``keyserver.toml`` (the built-in settings)::

        snp_ark_sha256 = {"<sha256 of an ARK's DER>" = "Genoa"}   # more AMD roots to trust besides Milan's
        dcap_root_ca = "intel-root.der"                            # replace dcap-qvl's pinned Intel root CA

    A setting no kind reads is refused (a typo would otherwise silently leave a default in force).
    """
    table = dict(settings or {})
    kinds = REGISTRY.kinds()
    unknown = set(table) - {name for kind in kinds for name in kind.settings}
    if unknown:
        raise UsageError(f"[attestation] has unknown setting(s) {sorted(unknown)}")
    return {kind.name: _built(kind, {k: table[k] for k in kind.settings if k in table}, base) for kind in kinds}


def get_verifier(kind: str) -> Verifier | None:
    """The unconfigured verifier of ``kind`` (offline checks: ``modelseal attest verify``), or None."""
    return REGISTRY.default_verifier(kind)


def agent_tables() -> dict[str, tuple[str, ...]]:
    """The agent config tables the kinds' collectors read, each with the keys it may hold."""
    tables: dict[str, tuple[str, ...]] = {}
    for kind in REGISTRY.kinds():
        if kind.agent_table is not None:
            known = tables.get(kind.agent_table, ())
            tables[kind.agent_table] = known + tuple(k for k in kind.agent_keys if k not in known)
    return tables


def collectors_from_config(kinds: Sequence[str], tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Collector]:
    """The agent's collectors for the evidence kinds it is configured to present, from its config tables.

    ``mtls`` is always there (the TLS handshake is the proof); ``none`` means only that, and cannot be
    combined with a TEE or TPM kind. Unknown kinds and missing settings fail at start-up.
    """
    if "none" in kinds and len(set(kinds) - {"mtls", "none"}) > 0:
        raise UsageError('evidence "none" (no TEE or TPM evidence) cannot be combined with other kinds')
    collectors: dict[str, Collector] = {"mtls": _collector("mtls", tables)}
    for name in kinds:
        if name not in ("mtls", "none"):
            collectors[name] = _collector(name, tables)
    return collectors


def _collector(name: str, tables: Mapping[str, Mapping[str, Any]]) -> Collector:
    kind = REGISTRY.get(name)
    if kind is None:
        names = ", ".join(["none", *(k.name for k in REGISTRY.kinds())])
        raise UsageError(f"unknown evidence kind {name!r} ({names})")
    return kind.collector(dict(tables.get(kind.agent_table, {})) if kind.agent_table else {})
