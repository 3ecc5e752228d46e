"""The mutation fuzzer in CI: a few thousand mutants of every sealed kind, run by ``bench/fuzz.py``.

Each mutant must be refused with a ``ModelsealError`` subclass or load as exactly the original; no case
may hang, and the fuzzing process's memory must stay bounded. The 100k-case run and its counts are in
docs/security.md (section Fuzzing). On ac0b701 this finds RecursionError, AttributeError and TypeError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.fuzzlib import MUTATIONS

ROOT = Path(__file__).resolve().parents[1]
CASES = 3500  # 500 per artifact kind; about 15 s on one core
KINDS = {"public", "hidden", "signed", "mlkem", "onnx", "torchscript", "dir"}


@pytest.mark.slow
def test_mutants_are_refused_or_identical(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    out = tmp_path / "report.json"
    env = {**os.environ, "MODELSEAL_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/fuzz.py"), "--cases", str(CASES), "--seed", "14", "--time-bound", "10",
         "--json", str(out), "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    assert out.exists(), proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["bugs"] == [], proc.stdout
    assert report["harness_errors"] == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["cases"] == CASES
    assert set(report["by_kind"]) == KINDS
    assert set(report["by_class"]) == set(MUTATIONS)  # every attack class was tried
    assert sum(report["refused"].values()) > 0.9 * CASES
    assert report["peak_rss_mib"] < 1024, report["peak_rss_mib"]
