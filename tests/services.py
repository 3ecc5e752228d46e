"""Real key services, agents and TPMs for tests: :mod:`modelseal.devstack`, plus what only a test does.

The harness itself (processes on free loopback ports, readiness, stopping) lives in the library, where the
demo and the benchmarks use it too; here a missing swtpm skips the test instead of failing it (except in
CI, where scripts/test.sh installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelseal import devstack
from modelseal.devstack import Agent, KeyServer, PostgresSchema, free_port, wait_for
from modelseal.errors import MissingDependencyError

__all__ = ["Agent", "KeyServer", "PostgresSchema", "SoftwareTpm", "free_port", "wait_for"]


class SoftwareTpm(devstack.SoftwareTpm):
    """:class:`modelseal.devstack.SoftwareTpm`, skipping the test where swtpm or tpm2-tools are missing."""

    def __init__(self, directory: Path) -> None:
        try:
            super().__init__(directory)
        except MissingDependencyError as exc:
            if os.environ.get("CI"):
                raise AssertionError(str(exc)) from None
            pytest.skip(str(exc))
