"""A recipient kind is one module plus one registration (issue 15): a toy kind defined here, outside the
package, is registered by the public function and by a real entry point, then seals and opens a model.
Also the one identity resolver (an Identity passes through untouched) and key ids read without a key."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import save_file

import modelseal
from modelseal.encoding import b64d, b64e
from modelseal.errors import AuthenticationError, KeyFileError, NoMatchingIdentityError, UsageError
from modelseal.load.artifacts import key_ids, open_locked, resolve_identity
from modelseal.recipients import registry
from modelseal.recipients.base import Identity, Recipient, Stanza
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.release.identity import AgentIdentity

from .conftest import make_tensors

TOY_LABEL = "MODELSEAL-IDENTITY-TOY"


class ToyKey:
    """Recipient and identity of a toy kind: AES-256-GCM under a key hashed from a name (a test, not security)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._kek = hashlib.sha256(b"toy kind " + name.encode()).digest()

    def describe(self) -> str:
        return f"toy:{self.name}"

    def matches(self, stanza: Stanza) -> bool:
        return stanza.get("type") == "toy" and stanza.get("name") == self.name

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        nonce = os.urandom(12)
        ct = AESGCM(self._kek).encrypt(nonce, bytes(dek), context)
        return {"type": "toy", "name": self.name, "nonce": b64e(nonce), "ct": b64e(ct)}

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        if not self.matches(stanza):
            return None
        try:
            return bytearray(AESGCM(self._kek).decrypt(b64d(stanza["nonce"]), b64d(stanza["ct"]), context))
        except InvalidTag:
            raise AuthenticationError("the toy stanza addressed to this name does not decrypt") from None


def register_toy(kinds: registry.Registry) -> None:
    """The toy kind's one registration: a recipient scheme, an identity spec and a key-file label."""
    kinds.scheme("toy", ToyKey)
    kinds.spec("toyid", ToyKey)
    kinds.label(TOY_LABEL, lambda raw: ToyKey(raw.decode()))


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Each test fills the registry again and leaves it as it found it (built-ins + installed entry points)."""
    registry.reset()
    yield
    registry.reset()
    sys.modules.pop("toy_kind", None)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.safetensors"
    save_file(make_tensors(), str(path))
    return path


def opens_with(sealed: Path, identity: object) -> None:
    with modelseal.safe_open(sealed, "np", identity=identity) as f:  # type: ignore[arg-type]
        for name, value in make_tensors().items():
            assert np.array_equal(f.get_tensor(name), value)


def seal_and_open_toy(plain: Path, tmp_path: Path) -> None:
    sealed = tmp_path / "toy.sealed.safetensors"
    modelseal.seal(plain, sealed, ["toy:alpha"])
    opens_with(sealed, "toyid:alpha")
    key_file = tmp_path / "alpha.key"
    key_file.write_text(f"# a toy identity\n{TOY_LABEL}:{b64e(b'alpha')}\n")
    opens_with(sealed, str(key_file))
    opens_with(sealed, f"{TOY_LABEL}:{b64e(b'alpha')}")  # identity text itself, as $MODELSEAL_IDENTITY holds it
    with pytest.raises(NoMatchingIdentityError, match="sealed to: toy"):
        opens_with(sealed, "toyid:beta")


def test_toy_kind_registered_by_function(fresh_registry: None, plain: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="unrecognised recipient"):
        modelseal.parse_recipient("toy:alpha")
    registry.register_kind(register_toy)
    assert isinstance(modelseal.parse_recipient("toy:alpha"), ToyKey)
    seal_and_open_toy(plain, tmp_path)


def register_raising(kinds: registry.Registry) -> None:
    """A plugin whose registration fails, with a message of several lines."""
    raise RuntimeError("the toy kind cannot start\n  a second line that must not reach the user")


def claim_agent(kinds: registry.Registry) -> None:
    """A plugin that tries to take over modelseal's own ``agent:`` identity spec."""
    kinds.spec("agent", ToyKey)


def claim_label_a(kinds: registry.Registry) -> None:
    """A plugin whose key-file label ``A`` is how the name of an existing file, ``A:B.key``, begins."""
    kinds.label("A", lambda raw: ToyKey(raw.decode()))


REENTRANT_SAW: list[list[str]] = []


def register_reentrant(kinds: registry.Registry) -> None:
    """A plugin that asks the registry which schemes exist while it is being registered."""
    register_toy(kinds)
    REENTRANT_SAW.append(registry.known_schemes())


def install_toy_distribution(root: Path, entry_point: str, name: str = "toy") -> None:
    """What ``pip install toy`` would leave: a module and a dist-info naming it in the recipients group."""
    (root / "toy_kind.py").write_text(
        f'"""A recipient kind that lives outside modelseal."""\n'
        f"from {__name__} import claim_agent, claim_label_a, register_raising, register_reentrant\n"
        f"from {__name__} import register_toy as register\n"
    )
    info = root / f"{name}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{name} = {entry_point}\n")
    importlib.invalidate_caches()


def test_toy_kind_registered_by_entry_point(
    fresh_registry: None, plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site").mkdir()
    install_toy_distribution(tmp_path / "site", "toy_kind:register")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    assert "toy" in registry.known_schemes() and "keyserver" in registry.known_schemes()
    seal_and_open_toy(plain, tmp_path)


def test_broken_plugin_is_named_in_one_line(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site").mkdir()
    install_toy_distribution(tmp_path / "site", "toy_kind:no_such_function")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    x25519 = f"x25519:{b64e(bytes(32))}"
    assert modelseal.parse_recipient(x25519)  # built-in names never wait on the plugins
    with pytest.raises(UsageError, match=r"^recipient plugin toy \(toy_kind:no_such_function\) cannot be loaded"):
        modelseal.parse_recipient("toy:AAAA")  # a name no built-in kind holds reads the plugins


def test_a_plugin_whose_registration_fails_is_named_in_one_line(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site").mkdir()
    install_toy_distribution(tmp_path / "site", "toy_kind:register_raising")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    with pytest.raises(UsageError) as refused:
        modelseal.parse_recipient("toy:AAAA")
    assert str(refused.value) == (
        "recipient plugin toy (toy_kind:register_raising) cannot register: RuntimeError: the toy kind cannot start"
    )


def test_a_plugin_that_fails_to_import_is_named_in_one_line(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "toy_kind_raises.py").write_text('raise RuntimeError("cannot import\\n  line two")\n')
    install_toy_distribution(tmp_path, "toy_kind_raises:register")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_kind_raises", raising=False)
    registry.reset()
    with pytest.raises(UsageError) as refused:
        registry.known_schemes()  # listing every kind reads the plugins
    assert str(refused.value).endswith("cannot be loaded: RuntimeError: cannot import")


def test_modelseals_own_kinds_need_no_install_metadata(fresh_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PYTHONPATH=src``, a zipapp or a frozen binary has no entry points: agent: and keyserver: stay."""
    monkeypatch.setattr(registry, "entry_points", lambda **_: ())
    registry.reset()
    assert "keyserver" in registry.known_schemes()
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)


def test_a_plugin_cannot_claim_modelseals_own_kinds_whatever_its_name(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built-ins are registered before every entry point, so ``aaa`` (sorted first) is the one refused; a
    built-in name is answered without the plugins, so the plugin never even sees it."""
    (tmp_path / "site").mkdir()
    install_toy_distribution(tmp_path / "site", "toy_kind:claim_agent", name="aaa")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)
    with pytest.raises(UsageError) as refused:
        modelseal.parse_recipient("nosuch:AAAA")
    assert str(refused.value) == (
        "recipient plugin aaa (toy_kind:claim_agent): the identity spec 'agent' is already registered by "
        "modelseal.release.identity:register (a name has one kind)"
    )


def test_builtin_and_installed_kinds(fresh_registry: None) -> None:
    kinds = registry.get_registry()
    assert {"x25519", "mlkem768x25519", "symmetric", "keyserver"} <= set(kinds.schemes)
    assert {"env", "passphrase-env", "agent"} <= set(kinds.specs)
    assert {"MODELSEAL-IDENTITY-X25519", "MODELSEAL-IDENTITY-MLKEM768X25519", "MODELSEAL-SYMMETRIC-KEY"} <= set(
        kinds.labels
    )
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)


def test_unknown_scheme_lists_the_known_ones(fresh_registry: None) -> None:
    with pytest.raises(KeyFileError) as err:
        modelseal.parse_recipient("nosuch:abc")
    message = str(err.value)
    for prefix in ("x25519:...", "mlkem768x25519:...", "symmetric:...", "keyserver:..."):
        assert prefix in message
    registry.register_kind(register_toy)
    with pytest.raises(KeyFileError, match=r"toy:\.\.\."):
        modelseal.parse_recipient("nosuch:abc")


def test_a_name_belongs_to_one_kind(fresh_registry: None) -> None:
    """A plugin cannot take over x25519: (and receive the data keys sealed to it) or an identity label."""
    with pytest.raises(UsageError, match=r"'x25519' is already registered by modelseal\.recipients\.hpke:register"):
        registry.register_kind(lambda kinds: kinds.scheme("x25519", ToyKey))
    with pytest.raises(UsageError, match="already registered"):
        registry.register_kind(lambda kinds: kinds.label("MODELSEAL-SYMMETRIC-KEY", lambda raw: ToyKey("x")))
    with pytest.raises(UsageError, match="not a valid recipient scheme name"):
        registry.register_kind(lambda kinds: kinds.scheme("Bad:Name", ToyKey))
    assert not isinstance(modelseal.parse_recipient(f"x25519:{b64e(bytes(32))}"), ToyKey)


def test_resolve_identity_passes_an_identity_through(host: HpkeIdentity, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_identity(host) is host
    monkeypatch.delenv("MODELSEAL_IDENTITY", raising=False)
    monkeypatch.setenv("MODELSEAL_AGENT_SOCKET", "/run/modelseal/agent.sock")
    agent = resolve_identity(None)
    assert isinstance(agent, AgentIdentity) and agent.socket == "/run/modelseal/agent.sock"
    assert resolve_identity(agent) is agent


class KeyserverStanza:
    """Writes the stanza a ``keyserver:`` recipient writes, without a key service."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        return {"type": "keyserver", "url": "https://keys.invalid:8443", "model": "m", "key_id": self.key_id}

    def describe(self) -> str:
        return "keyserver:https://keys.invalid:8443#m"


def test_key_ids_without_a_key(tmp_path: Path, plain: Path, host: HpkeIdentity) -> None:
    sealed = tmp_path / "m.sealed.safetensors"
    modelseal.seal(plain, sealed, [KeyserverStanza("k_one"), host.recipient])
    assert key_ids(sealed) == {"k_one"}
    with open_locked(sealed) as art:
        assert key_ids(art) == {"k_one"}
    src = tmp_path / "model"
    src.mkdir()
    save_file(make_tensors(), str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    modelseal.seal(src, tmp_path / "model.sealed", [KeyserverStanza("k_dir")])
    assert key_ids(tmp_path / "model.sealed") == {"k_dir"}
    bare = tmp_path / "bare.sealed.safetensors"
    modelseal.seal(plain, bare, [host.recipient])
    assert key_ids(bare) == set()


def test_toy_kind_satisfies_the_contract() -> None:
    toy = ToyKey("alpha")
    assert isinstance(toy, Recipient) and isinstance(toy, Identity)


def test_names_public_before_the_redesign_still_work(plain: Path, tmp_path: Path) -> None:
    """``modelseal.HpkeIdentity`` and ``modelseal.KEMS`` were importable (not in ``__all__``) and stay so."""
    identity = modelseal.HpkeIdentity.generate(modelseal.KEMS["mlkem768x25519"])
    sealed = tmp_path / "pq.sealed.safetensors"
    modelseal.seal(plain, sealed, [identity.recipient])
    opens_with(sealed, identity)
    assert set(modelseal.KEMS) == {"x25519", "mlkem768x25519"}
    assert not {"HpkeIdentity", "KEMS"} & set(modelseal.__all__)


def test_built_in_names_never_read_the_installed_plugins(
    fresh_registry: None, host: HpkeIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading every distribution's entry points costs milliseconds; a load with a built-in kind skips it."""

    def no_scan(**_: object) -> tuple[()]:
        raise AssertionError("the entry points were read")

    monkeypatch.setattr(registry, "entry_points", no_scan)
    registry.reset()
    host.save(tmp_path / "host.key")
    assert modelseal.load_identity(str(tmp_path / "host.key")).recipient.describe() == host.recipient.describe()
    assert modelseal.parse_recipient(host.recipient.describe())
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)
    assert not registry.is_identity_text(str(tmp_path / "host.key"))


class AlwaysEqual:
    """A factory that says it equals anything: how a plugin tried to take a built-in name (and its keys)."""

    def __init__(self, calls: list[tuple[object, ...]]) -> None:
        self.calls = calls

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __call__(self, *args: object) -> ToyKey:
        self.calls.append(args)
        return ToyKey("stolen")


def test_a_factory_that_compares_equal_to_everything_cannot_take_a_built_in_name(
    fresh_registry: None, host: HpkeIdentity, tmp_path: Path
) -> None:
    calls: list[tuple[object, ...]] = []
    steal = AlwaysEqual(calls)
    for claim in (
        lambda kinds: kinds.scheme("x25519", steal, public_key=True),
        lambda kinds: kinds.spec("agent", steal),
        lambda kinds: kinds.spec("env", steal),
        lambda kinds: kinds.label("MODELSEAL-IDENTITY-X25519", steal),
    ):
        with pytest.raises(UsageError, match=r"is already registered by modelseal\.recipients\.|by modelseal\.release"):
            registry.register_kind(claim, "stealer")
    host.save(tmp_path / "host.key")
    assert modelseal.load_identity(str(tmp_path / "host.key")).recipient.describe() == host.recipient.describe()
    assert not isinstance(modelseal.parse_recipient(host.recipient.describe()), ToyKey)
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)
    assert calls == []
    registry.register_scheme("toy", ToyKey)
    registry.register_scheme("toy", ToyKey)  # the identical registration again is no conflict
    with pytest.raises(UsageError, match="'toy' is already registered by scheme toy:"):
        registry.register_scheme("toy", AlwaysEqual(calls))


def install_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *plugins: tuple[str, str]) -> None:
    """Install each ``(name, entry point)`` as its own distribution, then fill the registry afresh."""
    site = tmp_path / "site"
    site.mkdir()
    for name, target in plugins:
        install_toy_distribution(site, target, name=name)
    monkeypatch.syspath_prepend(str(site))
    registry.reset()


def test_a_broken_plugin_leaves_key_files_and_paths_with_colons_working(
    fresh_registry: None, host: HpkeIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What worked before plugins existed (``-r host.pub``, ``-i A:B.key``, ``-i env:K``) needs no plugin."""
    install_site(tmp_path, monkeypatch, ("toy", "toy_kind:no_such_function"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "host.pub").write_text(f"# a public key\n{host.recipient.describe()}\n")
    host.save(tmp_path / "A:B.key")
    (tmp_path / "dir:x").mkdir()
    host.save(tmp_path / "dir:x" / "h.key")
    assert modelseal.parse_recipient("host.pub").describe() == host.recipient.describe()
    for path in ("A:B.key", "dir:x/h.key", str(tmp_path / "A:B.key")):
        assert modelseal.load_identity(path).recipient.describe() == host.recipient.describe()
    (tmp_path / "env:K").write_text("not a key")  # a built-in spec prefix keeps its meaning
    monkeypatch.setenv("K", (tmp_path / "A:B.key").read_text())
    assert modelseal.load_identity("env:K").recipient.describe() == host.recipient.describe()
    with pytest.raises(UsageError, match=r"^recipient plugin toy \(toy_kind:no_such_function\) cannot be loaded"):
        modelseal.load_identity("kms:x")  # a prefix no built-in kind holds, naming no file, reads the plugins


def test_a_plugin_label_does_not_turn_an_existing_path_into_key_text(
    fresh_registry: None, host: HpkeIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_site(tmp_path, monkeypatch, ("alabel", "toy_kind:claim_label_a"))
    monkeypatch.chdir(tmp_path)
    host.save(tmp_path / "A:B.key")
    assert not registry.is_identity_text("A:B.key")
    assert modelseal.load_identity("A:B.key").recipient.describe() == host.recipient.describe()
    assert registry.is_identity_text(f"A:{b64e(b'alpha')}")  # the plugin's label, given as text, is key text


def test_a_failed_plugin_is_reported_the_same_on_every_lookup_and_publishes_nothing(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good plugin loaded before the broken one is not registered again (and called a conflict with itself)."""
    install_site(tmp_path, monkeypatch, ("aaa", "toy_kind:register"), ("kms", "toy_kind:no_such_function"))
    messages = []
    for _ in range(3):
        with pytest.raises(UsageError) as refused:
            registry.known_schemes()
        messages.append(str(refused.value))
    assert messages[0].startswith("recipient plugin kms (toy_kind:no_such_function) cannot be loaded: ")
    assert messages == [messages[0]] * 3 and "\n" not in messages[0]
    with pytest.raises(UsageError, match=r"^recipient plugin kms"):
        modelseal.parse_recipient("toy:alpha")  # the good plugin's kind is not half-published either
    assert modelseal.parse_recipient(f"x25519:{b64e(bytes(32))}")  # built-in lookups keep working
    assert isinstance(modelseal.load_identity("agent:/run/x.sock"), AgentIdentity)


def test_a_plugin_asking_the_registry_while_it_registers_sees_what_is_loaded_so_far(
    fresh_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_site(tmp_path, monkeypatch, ("reent", "toy_kind:register_reentrant"))
    REENTRANT_SAW.clear()
    assert "toy" in registry.known_schemes()
    (saw,) = REENTRANT_SAW
    assert {"toy", "x25519", "keyserver"} <= set(saw)
    assert isinstance(modelseal.parse_recipient("toy:alpha"), ToyKey)


def register_nothing(kinds: registry.Registry) -> None:
    """A kind whose factories hand back nothing, or the wrong thing."""
    kinds.scheme("nothing", lambda rest: None)  # type: ignore[arg-type,return-value]
    kinds.spec("nothing", lambda rest: None)  # type: ignore[arg-type,return-value]
    kinds.spec("notalist", lambda rest: [ToyKey("a"), 3])  # type: ignore[list-item]
    kinds.label("MODELSEAL-IDENTITY-NOTHING", lambda raw: None, raw_size=7)  # type: ignore[arg-type,return-value]


def test_a_plugin_handing_back_the_wrong_thing_is_named_in_one_line(fresh_registry: None, tmp_path: Path) -> None:
    registry.register_kind(register_nothing, "nothing plugin")
    with pytest.raises(UsageError) as refused:
        modelseal.parse_recipient("nothing:x")
    assert str(refused.value) == "nothing plugin: the recipient scheme 'nothing' returned None, not a Recipient"
    (tmp_path / "seven.bin").write_bytes(b"\xff" * 7)
    label = "the key-file label 'MODELSEAL-IDENTITY-NOTHING' returned None"
    for spec, refusal in (
        ("nothing:x", "the identity spec 'nothing' returned None"),
        ("notalist:x", "the identity spec 'notalist' returned a list holding a value of type int"),
        (f"MODELSEAL-IDENTITY-NOTHING:{b64e(b'x')}", label),
        (str(tmp_path / "seven.bin"), label),  # a binary key file of the label's raw size
    ):
        with pytest.raises(UsageError) as refused:
            modelseal.load_identity(spec)
        assert str(refused.value) == f"nothing plugin: {refusal}, not an Identity"
