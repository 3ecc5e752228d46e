"""The three role guides are run, as written, by a test: every fenced ``bash`` block, in order, in one bash
session in an empty temporary directory, with ``modelseal`` and this interpreter on PATH. The owner's and
the host's pages run in one session, in that order (the host uses what the owner made and the key service
the owner started); the developer's page runs alone (it seals its own model and starts its own server).

What a page may rely on, and what it must look like:

- ``bash`` blocks are run; other blocks (``sh`` for install lines the reader runs once, ``toml``,
  ``python``, ``text``) are not. Code the walk needs is written to a file by a ``bash`` block, with a
  heredoc, so the reader sees and runs the same code.
- A ``text`` block right after a ``bash`` block is the output that block shows: each of its lines must
  appear in the real output, in order (other lines may come between). ``...`` inside a line stands for
  anything (ids, hashes, times); a line that is only ``...`` stands for lines left out.
- Services run in the background (``&``) with their output sent to a file, and the page waits for them
  with a command the reader can run too (``until curl ...; do sleep 0.2; done``). The ports the pages use,
  8443 (key service), 8000 and 8001 (HTTP and gRPC inference), become free ports here: the same text is
  replaced in the commands and in the shown output.
- The session stops at the first failing command (``set -e -o pipefail``) and the test names the block.
  Background jobs are killed at the end, whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelseal.devstack import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = {"owner-host": ["owner", "host"], "developer": ["developer"]}
GUIDES = [ROOT / "docs" / f"guide-{role}.md" for role in ("owner", "host", "developer")]
PORTS = ("8443", "8000", "8001")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
MARK = "::modelseal-guide-block {}::"


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of ``page``, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def steps(pages: list[Path]) -> list[tuple[str, str, str | None]]:
    """``(where, bash, shown output or None)`` for every bash block of the pages, in order."""
    out: list[tuple[str, str, str | None]] = []
    for page in pages:
        found = blocks(page)
        for i, (language, text) in enumerate(found):
            if language == "bash":
                shown = found[i + 1][1] if i + 1 < len(found) and found[i + 1][0] == "text" else None
                out.append((f"{page.name}, bash block {sum(1 for s in out if s[0].startswith(page.name)) + 1}",
                            text, shown))  # fmt: skip
    return out


def matches(shown: str, actual: str) -> str | None:
    """None if every shown line appears in ``actual`` in order (``...`` = anything); else the first that
    does not."""
    lines = actual.splitlines()
    at = 0
    for want in shown.splitlines():
        if want.strip() in ("", "..."):
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.strip().split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at].strip()):
            at += 1
        if at == len(lines):
            return want
        at += 1
    return None


def substitute(text: str, ports: dict[str, str]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"(?<=:){old}\b", new, text)
    return text


def test_the_guides_exist_and_have_commands() -> None:
    for page in GUIDES:
        assert page.exists(), f"{page} is missing"
        assert any(language == "bash" for language, _ in blocks(page)), f"{page.name} has no bash block"


@pytest.mark.parametrize("session", SESSIONS, ids=str)
def test_the_guides_run_as_written(tmp_path: Path, session: str) -> None:
    ports = {old: str(free_port()) for old in PORTS}
    plan = steps([ROOT / "docs" / f"guide-{role}.md" for role in SESSIONS[session]])
    script = ["set -e -o pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for n, (_where, text, _shown) in enumerate(plan):
        script += [f"echo '{MARK.format(n)}'", substitute(text, ports)]
    script.append(f"echo '{MARK.format(len(plan))}'")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    for var in ("MODELSEAL_IDENTITY", "MODELSEAL_AGENT_SOCKET", "MODELSEAL_ADMIN_TOKEN", "MODELSEAL_ADMIN_TOKEN_FILE"):
        env.pop(var, None)
    run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    outputs = re.split(r"^::modelseal-guide-block (\d+)::$", run.stdout, flags=re.M)
    seen = {int(outputs[i]): outputs[i + 1] for i in range(1, len(outputs) - 1, 2)}
    reached = max(seen, default=-1)
    if run.returncode != 0 or reached < len(plan):
        where = plan[reached][0] if 0 <= reached < len(plan) else "the start"
        pytest.fail(
            f"the guides stop at {where} (exit {run.returncode}):\n{seen.get(reached, '')[-3000:]}\n"
            f"stderr:\n{run.stderr[-3000:]}"
        )
    for n, (where, _text, shown) in enumerate(plan):
        if shown is not None:
            missing = matches(substitute(shown, ports), seen[n])
            assert missing is None, f"{where}: the page shows {missing!r}, the command printed:\n{seen[n][-3000:]}"


def test_the_matcher() -> None:
    assert matches("a ... c\n...\nlast", "x\na b c\nmiddle\nlast\n") is None
    assert matches("a ... c\nnot there", "a b c\n") == "not there"
    assert substitute("https://127.0.0.1:8443/v1 and 18443 and :8000", {"8443": "1", "8000": "2"}) == (
        "https://127.0.0.1:1/v1 and 18443 and :2"
    )
