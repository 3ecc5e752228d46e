"""The configuration examples in docs/operations.md use only keys the programs accept (unknown keys are
errors since issue 14, so a stale example would fail a user who copies it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from modelseal.agent.config import _check_keys as check_agent_keys
from modelseal.keyserver.config import check_keys as check_keyserver_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def toml_blocks() -> list[dict[str, object]]:
    return [tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.DOTALL)]


def test_operations_examples_use_known_keys() -> None:
    keyserver, agent = (b for b in toml_blocks() if "server" in b or "keyserver" in b)
    check_keyserver_keys(keyserver, DOC)
    check_agent_keys(agent)
