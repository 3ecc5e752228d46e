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


def install_toy_distribution(root: Path, entry_point: str, name: str = "toy") -> None:
    """What ``pip install toy`` would leave: a module and a dist-info naming it in the recipients group."""
    (root / "toy_kind.py").write_text(
        f'"""A recipient kind that lives outside modelseal."""\n'
        f"from {__name__} import claim_agent, register_raising, register_toy as register\n"
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
