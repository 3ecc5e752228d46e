"""The process harness's own promises: waits end in one clear error, a process that dies before it is ready
is named with its last log line, and a log reused from an earlier run never counts as ready."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from modelseal import devstack
from modelseal.devstack import ModelsealProcess, StackError


def test_wait_for_ends_in_one_line_naming_what() -> None:
    start = time.monotonic()
    with pytest.raises(StackError, match=r"^timed out after 0.1 s waiting for the thing$"):
        devstack.wait_for(lambda: False, 0.1, "the thing")
    assert time.monotonic() - start < 1
    devstack.wait_for(lambda: True, 0)  # true at once: no wait at all


def test_free_port_pair_is_two_free_ports() -> None:
    port = devstack.free_port_pair()
    for p in (port, port + 1):
        with socket.socket() as s:
            s.bind((devstack.LOOPBACK, p))


class Version(ModelsealProcess):
    """``modelseal --version``: exits at once with status 0, so it is never "ready"."""

    what = "version printer"
    ready_timeout = 20

    def command(self) -> list[str]:
        return ["--version"]

    def ready(self) -> bool:
        return "server ready" in self.log_since_start()


@pytest.mark.slow  # one real `python -m modelseal` process
def test_exit_before_ready_names_the_last_line_and_a_stale_log_does_not_count(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text("2026 modelseal.serve INFO server ready: an earlier run\n")
    process = Version(log)
    with pytest.raises(StackError) as caught:
        process.start()  # the earlier run's "server ready" must not make this one ready
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the version printer exited with status 0: python -m modelseal, version ")
    assert message.endswith(f"(log: {log})")
    assert caught.value.__notes__ and "modelseal, version" in caught.value.__notes__[0]
    assert "earlier run" not in caught.value.__notes__[0]
    assert process.stop() == 0
