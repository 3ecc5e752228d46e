"""The identity contract (age's incorrect-identity rule): an identity that is not the right one, or
cannot answer (a wrong passphrase, an agent that is down), lets the next identity try; every reason is
reported only when none succeeds. Issue 14, item 10."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.errors import AuthenticationError, KeyReleaseError, NoMatchingIdentityError
from modelseal.recipients.base import Stanza
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.recipients.passphrase import Passphrase

from .conftest import make_tensors

FAST = 10  # scrypt work factor for tests (the minimum the format accepts)


class KeyserverStanza:
    """A recipient that writes the stanza a ``keyserver:`` recipient writes, without a key service:
    only the agent can answer it, so a host without a running agent must fall through to its key."""

    def wrap(self, dek: bytes, context: bytes) -> Stanza:
        return {"type": "keyserver", "url": "https://keys.invalid:8443", "model": "m", "key_id": "k_test"}

    def describe(self) -> str:
        return "keyserver:https://keys.invalid:8443#m"


def sealed(tmp_path: Path, recipients: list[object], name: str = "m") -> tuple[Path, dict[str, np.ndarray]]:
    tensors = make_tensors()
    plain = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(plain))
    out = tmp_path / f"{name}.sealed.safetensors"
    modelseal.seal(plain, out, recipients)
    return out, tensors


def same(loaded: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> bool:
    return loaded.keys() == tensors.keys() and all(np.array_equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("order", ["wrong-first", "wrong-last"])
def test_wrong_passphrase_lets_the_right_key_open(tmp_path: Path, host: HpkeIdentity, order: str) -> None:
    """ac0b701: the wrong passphrase raised "wrong passphrase" and aborted, although the x25519 key fits."""
    path, tensors = sealed(tmp_path, [Passphrase("owner's passphrase", FAST), host.recipient])
    wrong = Passphrase("not the passphrase", FAST)
    identities = [wrong, host] if order == "wrong-first" else [host, wrong]
    assert same(modelseal.numpy.load_file(path, identity=identities), tensors)


def test_second_passphrase_of_two(tmp_path: Path) -> None:
    path, tensors = sealed(tmp_path, [Passphrase("alice", FAST), Passphrase("bob", FAST)])
    assert same(modelseal.numpy.load_file(path, identity=Passphrase("bob", FAST)), tensors)
    assert same(modelseal.numpy.load_file(path, identity=[Passphrase("carol", FAST), Passphrase("bob", FAST)]), tensors)


def test_unreachable_agent_lets_the_host_key_open(tmp_path: Path, host: HpkeIdentity) -> None:
    """ac0b701: an agent that is down raised agent_unavailable before the host key was tried."""
    path, tensors = sealed(tmp_path, [KeyserverStanza(), host.recipient])
    agent = f"agent:{tmp_path / 'no-agent.sock'}"
    assert same(modelseal.numpy.load_file(path, identity=[agent, host]), tensors)


def test_one_reason_keeps_its_type_and_code(tmp_path: Path, other_host: HpkeIdentity) -> None:
    path, _ = sealed(tmp_path, [KeyserverStanza(), Passphrase("owner", FAST)])
    with pytest.raises(KeyReleaseError) as agent_down:
        modelseal.numpy.load_file(path, identity=f"agent:{tmp_path / 'no-agent.sock'}")
    assert agent_down.value.code == "agent_unavailable"
    with pytest.raises(NoMatchingIdentityError, match="wrong passphrase"):
        modelseal.numpy.load_file(path, identity=[Passphrase("nope", FAST), other_host])


def test_every_reason_when_none_succeeds(tmp_path: Path, other_host: HpkeIdentity) -> None:
    path, _ = sealed(tmp_path, [KeyserverStanza(), Passphrase("owner", FAST)])
    ids = [f"agent:{tmp_path / 'no-agent.sock'}", Passphrase("nope", FAST), other_host]
    with pytest.raises(NoMatchingIdentityError) as err:
        modelseal.numpy.load_file(path, identity=ids)
    message = str(err.value)
    assert "cannot reach the modelseal agent" in message and "wrong passphrase" in message
    assert "sealed to: keyserver, scrypt" in message


class TamperedForMe:
    """An identity whose stanza is addressed to it but fails to decrypt (what HPKE reports on tampering)."""

    def unwrap(self, stanza: Stanza, context: bytes) -> bytearray | None:
        raise AuthenticationError("the data-key stanza addressed to this identity does not decrypt: tampered")

    def describe(self) -> str:
        return "tampered-for-me"


def test_tampered_stanza_addressed_to_me_still_stops(tmp_path: Path, host: HpkeIdentity) -> None:
    """Not-mine is not "anything goes": a stanza addressed to an identity that fails to decrypt stops."""
    path, _ = sealed(tmp_path, [host.recipient])
    with pytest.raises(AuthenticationError, match="tampered"):
        modelseal.numpy.load_file(path, identity=[TamperedForMe(), host])


def test_cli_opens_with_wrong_passphrase_and_dead_agent_listed_first(tmp_path: Path, host: HpkeIdentity) -> None:
    path, tensors = sealed(tmp_path, [Passphrase("owner", FAST), KeyserverStanza(), host.recipient])
    key = tmp_path / "host.key"
    host.save(key)
    proc = subprocess.run(
        [sys.executable, "-m", "modelseal", "open", str(path), "-o", str(tmp_path / "plain.safetensors"),
         "-i", f"agent:{tmp_path / 'no-agent.sock'}", "--passphrase-env", "PW", "-i", str(key)],
        capture_output=True, text=True, timeout=120, env={"PW": "wrong", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    assert same(load_file(str(tmp_path / "plain.safetensors")), tensors)


def test_passphrase_stanzas_are_bounded(tmp_path: Path) -> None:
    """Every passphrase now tries every scrypt stanza, and one try may cost seconds and 4 GiB (log_n 22):
    a header may hold at most 4 of them, at sealing and at loading."""
    from modelseal.errors import FormatError

    with pytest.raises(FormatError, match="more than the limit of 4"):
        sealed(tmp_path, [Passphrase(f"p{i}", FAST) for i in range(5)])
    assert not list(tmp_path.glob("*.sealed.safetensors"))
