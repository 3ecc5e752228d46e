"""A lease watchdog for engines that keep decrypted weights in memory after loading (vLLM, ...).

Weights already in an engine's memory cannot be recalled, so the engine must stop by itself when the
owner revokes the key or the lease runs out. Every ``check_s`` the watchdog asks the host agent for each
key the model was sealed to, exactly as a loader would (any user the agent serves may do this, unlike
``status``). A refusal (revoked, expired, no longer granted) or an agent that cannot be reached starts
the grace period; the key answering again ends it; when ``grace_s`` has passed the watchdog calls
``on_lost`` with the reason, once. The key bytes received are wiped at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from modelseal.crypto import keys
from modelseal.errors import KeyReleaseError
from modelseal.release.wire import ask

log = logging.getLogger("modelseal.leasewatch")


class LeaseWatch:
    """See the module docstring. ``check`` is one round; :meth:`start` runs rounds on a daemon thread."""

    def __init__(
        self,
        socket: str,
        watched: Iterable[tuple[str, str]],
        check_s: float,
        grace_s: float,
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = log,
    ) -> None:
        self.log = log
        self.socket = socket
        self.watched = sorted(set(watched))
        self.check_s, self.grace_s = check_s, grace_s
        self.on_lost = on_lost
        self.clock = clock
        self.failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _problem(self) -> str | None:
        for key_id, model in self.watched:
            try:
                _answer, key = ask(self.socket, {"op": "key", "key_id": key_id, "model": model}, timeout=30)
            except KeyReleaseError as exc:
                return f"key {key_id} of model {model!r}: {exc.code}: {exc}"
            keys.wipe(key)
        return None

    def check(self) -> str | None:
        """One round: the reason to stop now, or None (the key is held, or the grace period runs)."""
        problem = self._problem()
        now = self.clock()
        if problem is None:
            if self.failing_since is not None:
                self.log.warning("modelseal: the key is released again; the engine keeps running")
            self.failing_since = None
            return None
        if self.failing_since is None:
            self.failing_since = now
            self.log.error("modelseal: %s; stopping in %.0f s unless the key is released again", problem, self.grace_s)
        if now - self.failing_since >= self.grace_s:
            return problem
        return None

    def start(self) -> None:
        if self.check_s <= 0 or not self.watched or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="modelseal-leasewatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            reason = self.check()
            if reason is not None:
                self.on_lost(reason)
                return

    def stop(self) -> None:
        self._stop.set()
