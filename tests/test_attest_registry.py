"""The attestation-kind registry as a seam: a kind from outside the package (its verifier and its host
collector in one module) joins by one registration, either ``register_kind`` or an entry point of an
installed distribution, and the key service's and the agent's configuration build from the registry
without changing it."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from modelseal.attest import (
    ENTRY_POINT_GROUP,
    EvidenceError,
    VerificationContext,
    collectors_from_config,
    get_verifier,
    known_kinds,
    register_kind,
    verifiers_from_config,
)
from modelseal.attest import registry as attest_registry
from modelseal.attest.base import unmet
from modelseal.attest.snp import AMD_ARKS
from modelseal.errors import UsageError

BUILTIN = ["mtls", "nvidia-gpu", "sev-snp", "sgx", "tdx", "tpm"]
BINDING = bytes(range(32))

# A whole attestation kind, as another distribution would ship it: its verifier reads the key service's
# [attestation] toy_min_level, its collector the agent's [toy] table.
TOY_KIND = """
from modelseal.attest.base import AttestationKind, Claims, EvidenceError, normalise_requirement


class ToyVerifier:
    kind = "{name}"

    def __init__(self, min_level):
        self.min_level = min_level

    def verify(self, evidence, ctx):
        if evidence.get("level", -1) < self.min_level:
            raise EvidenceError(f"toy level {{evidence.get('level')}} is below {{self.min_level}}")
        bound = ctx.binding is not None and evidence.get("binding") == ctx.binding.hex()
        return Claims(kind=self.kind, measurements={{"level": str(evidence["level"])}}, report_data_bound=bound)

    def check_requirement(self, requirement):
        return normalise_requirement(requirement)


def collector(table):
    level = int(table.get("level", 1))
    return lambda binding, nonce: {{"kind": "{name}", "level": level, "binding": binding.hex()}}


KIND = AttestationKind(
    "{name}",
    verifier=lambda settings, base: ToyVerifier(int(settings.get("toy_min_level", 0))),
    collector=collector,
    settings=("toy_min_level",),
    agent_table="toy",
    agent_keys=("level",),
)
"""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> attest_registry.Registry:
    """A registry of this test's own, so a registered toy does not outlive the test."""
    registry = attest_registry.Registry()
    monkeypatch.setattr(attest_registry, "REGISTRY", registry)
    return registry


def toy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str = "toy") -> ModuleType:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(TOY_KIND.format(name=name)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(module)


@pytest.fixture
def installed_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An installed distribution (a dist-info with entry_points.txt on sys.path) providing kind ``toy``."""
    write_distribution(tmp_path, "toy_attest_plugin", {"toy": "toy_attest_plugin:KIND"})
    (tmp_path / "toy_attest_plugin.py").write_text(textwrap.dedent(TOY_KIND.format(name="toy")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_attest_plugin", raising=False)
    yield "toy"
    sys.modules.pop("toy_attest_plugin", None)


def write_distribution(root: Path, name: str, kinds: dict[str, str]) -> None:
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{kind} = {target}\n" for kind, target in kinds.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


def release_round_trip(kind: str, agent_tables: dict[str, dict[str, int]], settings: dict[str, int]) -> object:
    """What one release does with a kind: the agent collects, the key service verifies."""
    collectors = collectors_from_config([kind], agent_tables)
    assert set(collectors) == {"mtls", kind}
    evidence = collectors[kind](BINDING, b"")
    verifier = verifiers_from_config(settings)[kind]
    return verifier.verify(evidence, VerificationContext(None, BINDING, b"", 0))


def test_builtin_kinds_are_known_without_any_import_side_effect(fresh_registry: attest_registry.Registry) -> None:
    assert known_kinds() == BUILTIN
    assert sorted(verifiers_from_config()) == BUILTIN
    assert {kind: get_verifier(kind).kind for kind in BUILTIN} == {kind: kind for kind in BUILTIN}  # type: ignore[union-attr]
    assert get_verifier("toy") is None


def test_a_kind_registered_through_the_api_verifies_and_collects(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_kind(toy_module(tmp_path, monkeypatch, "toy_attest_api").KIND)
    assert "toy" in known_kinds()
    claims = release_round_trip("toy", {"toy": {"level": 5}}, {"toy_min_level": 3})
    assert claims.report_data_bound and claims.measurements == {"level": "5"}  # type: ignore[attr-defined]
    with pytest.raises(EvidenceError, match="toy level 2 is below 3"):
        release_round_trip("toy", {"toy": {"level": 2}}, {"toy_min_level": 3})
    verifier = verifiers_from_config()["toy"]
    requirement = verifier.check_requirement({"kind": "toy", "measurements": {"level": "9"}})
    assert unmet(requirement, claims) == "toy measurement level = 5 is not one the grant allows"  # type: ignore[arg-type]
    assert attest_registry.agent_tables()["toy"] == ("level",)


def test_a_kind_from_an_installed_distribution_joins_through_its_entry_point(
    fresh_registry: attest_registry.Registry, installed_toy: str
) -> None:
    assert known_kinds() == sorted([*BUILTIN, installed_toy])
    claims = release_round_trip(installed_toy, {"toy": {"level": 1}}, {})
    assert claims.kind == "toy" and claims.report_data_bound  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="unknown setting"):
        verifiers_from_config({"toy_min_levle": 1})


def test_a_kind_cannot_replace_another(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = toy_module(tmp_path, monkeypatch, "toy_attest_impostor", name="tpm")
    with pytest.raises(UsageError, match="'tpm' is already registered"):
        register_kind(impostor.KIND)
    toy = toy_module(tmp_path, monkeypatch, "toy_attest_twice")
    register_kind(toy.KIND)
    with pytest.raises(UsageError, match="'toy' is already registered"):
        register_kind(toy.KIND)


def test_an_installed_distribution_cannot_replace_a_builtin_kind(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_distribution(tmp_path, "evil_attest_plugin", {"tpm": "evil_attest_plugin:KIND"})
    (tmp_path / "evil_attest_plugin.py").write_text(textwrap.dedent(TOY_KIND.format(name="tpm")))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"'tpm' \(entry point evil_attest_plugin:KIND of evil_attest_plugin\) is "):
        known_kinds()


def test_a_broken_entry_point_stops_start_up_with_its_name(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_distribution(tmp_path, "broken_attest_plugin", {"broken": "no_such_module_xyz:KIND"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UsageError, match=r"'broken' .*cannot be loaded: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ):
        verifiers_from_config()


def test_configuration_builds_new_verifiers_and_leaves_the_registry_alone(
    fresh_registry: attest_registry.Registry, tmp_path: Path
) -> None:
    genoa = {"AB:CD": "Genoa"}
    root = tmp_path / "root.der"
    root.write_bytes(b"a root CA")
    first = verifiers_from_config({"snp_ark_sha256": genoa, "dcap_root_ca": "root.der"}, tmp_path)
    second = verifiers_from_config({})
    assert first["sev-snp"].arks == {**AMD_ARKS, "abcd": "Genoa"}  # type: ignore[attr-defined]
    assert second["sev-snp"].arks == AMD_ARKS  # type: ignore[attr-defined]
    assert first["sgx"].root_ca_der == first["tdx"].root_ca_der == b"a root CA"  # type: ignore[attr-defined]
    assert second["sgx"].root_ca_der is None  # type: ignore[attr-defined]
    assert all(first[kind] is not second[kind] for kind in BUILTIN)
    assert get_verifier("sev-snp").arks == AMD_ARKS  # type: ignore[union-attr]
    assert known_kinds() == BUILTIN


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"snp_ark": {}}, r"\[attestation\] has unknown setting\(s\) \['snp_ark'\]"),
        ({"snp_ark_sha256": ["ab"]}, "snp_ark_sha256 must map SHA-256 fingerprints to product names"),
        ({"dcap_root_ca": "missing.der"}, r"\[attestation\] dcap_root_ca: cannot read .*missing.der: No such file"),
    ],
)
def test_bad_attestation_settings_are_refused(
    fresh_registry: attest_registry.Registry, tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        verifiers_from_config(settings, tmp_path)


def test_a_plugin_error_is_one_line_with_its_type(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_distribution(tmp_path, "raising_attest_plugin", {"raising": "raising_attest_plugin:KIND"})
    (tmp_path / "raising_attest_plugin.py").write_text('raise RuntimeError("no device\\n  second line")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "raising_attest_plugin", raising=False)
    with pytest.raises(UsageError) as refused:
        known_kinds()
    assert str(refused.value).endswith("cannot be loaded: RuntimeError: no device")


def test_attest_kinds_with_a_broken_plugin_is_one_line_and_exit_1(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from modelseal.cli.main import main

    write_distribution(tmp_path, "broken_attest_plugin", {"broken": "no_such_module_xyz:KIND"})
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["attest", "kinds"], prog_name="modelseal")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # not an escaped UsageError
    assert result.output.startswith("modelseal: error: attestation kind 'broken' (entry point no_such_module_xyz")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_two_installed_distributions_providing_one_kind_are_both_named(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "toy_attest_plugin.py").write_text(textwrap.dedent(TOY_KIND.format(name="toy")))
    for dist in ("toy_attest_a", "toy_attest_b"):
        (tmp_path / dist).mkdir()
        write_distribution(tmp_path / dist, dist, {"toy": "toy_attest_plugin:KIND"})
        monkeypatch.syspath_prepend(str(tmp_path / dist))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_attest_plugin", raising=False)
    with pytest.raises(UsageError) as refused:
        known_kinds()
    message = str(refused.value)
    assert "toy_attest_a" in message and "toy_attest_b" in message and "by modelseal" not in message


def test_register_verifier_adds_a_kind_without_a_collector(fresh_registry: attest_registry.Registry) -> None:
    """The pre-registry public name: a verifier alone becomes a kind the key service checks; an agent
    configured to present it is refused at start-up, naming why."""
    from modelseal.attest import register_verifier

    class Legacy:
        kind = "legacy"

        def verify(self, evidence: dict[str, object], ctx: VerificationContext) -> object:
            raise EvidenceError("legacy evidence is never good enough")

        def check_requirement(self, requirement: dict[str, object]) -> dict[str, object]:
            return requirement

    verifier = Legacy()
    register_verifier(verifier)  # type: ignore[arg-type]
    assert "legacy" in known_kinds()
    assert get_verifier("legacy") is verifier and verifiers_from_config()["legacy"] is verifier
    with pytest.raises(UsageError, match=r"evidence kind 'legacy' has no collector .*register_verifier"):
        collectors_from_config(["legacy"], {})
    with pytest.raises(UsageError, match="'tpm' is already registered"):
        register_verifier(Legacy.__new__(type("Impostor", (Legacy,), {"kind": "tpm"})))  # type: ignore[arg-type]


# A kind whose name (and its verifier's kind) compares equal to anything and hashes like "tpm": a check
# with == / != would let it in, and verifiers_from_config's {kind.name: verifier} would then hand the
# tpm verifier's place to it.
IMPOSTOR_KIND = """
from modelseal.attest.base import AttestationKind


class LooksLikeTpm:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __hash__(self):
        return hash("tpm")


class Impostor:
    kind = LooksLikeTpm()

    def verify(self, evidence, ctx):
        raise AssertionError("the impostor verified")

    def check_requirement(self, requirement):
        return requirement


KIND = AttestationKind(LooksLikeTpm(), verifier=lambda settings, base: Impostor(), collector=lambda table: None)
"""


def test_a_kind_whose_name_compares_equal_to_anything_is_refused(
    fresh_registry: attest_registry.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_distribution(tmp_path, "impostor_attest_plugin", {"impostor": "impostor_attest_plugin:KIND"})
    (tmp_path / "impostor_attest_plugin.py").write_text(textwrap.dedent(IMPOSTOR_KIND))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "impostor_attest_plugin", raising=False)
    with pytest.raises(UsageError, match=r"^attestation kind 'impostor' \(.*\) calls itself a LooksLikeTpm$"):
        known_kinds()
    impostor = importlib.import_module("impostor_attest_plugin")
    monkeypatch.setattr(attest_registry, "entry_points", lambda **_: ())
    monkeypatch.setattr(attest_registry, "REGISTRY", attest_registry.Registry())
    with pytest.raises(UsageError, match=r"^an attestation kind's name is a str, not LooksLikeTpm$"):
        register_kind(impostor.KIND)
    toy = toy_module(tmp_path, monkeypatch, "toy_attest_two_faced")
    two_faced = dataclasses.replace(toy.KIND, verifier=lambda settings, base: impostor.Impostor())
    register_kind(two_faced)
    with pytest.raises(UsageError, match=r"^attestation kind 'toy' built a verifier for a LooksLikeTpm$"):
        verifiers_from_config()
    assert known_kinds() == sorted([*BUILTIN, "toy"])
