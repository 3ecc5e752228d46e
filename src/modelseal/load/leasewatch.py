"""A lease watchdog for engines that keep decrypted weights in memory after loading (vLLM, ...).

Weights already in an engine's memory cannot be recalled, so the engine must stop by itself when the
owner revokes the key or the lease runs out. Every ``check_s`` the watchdog asks the host agent for each
key the model was sealed to, exactly as a loader would (any user the agent serves may do this, unlike
``status``). A refusal (revoked, expired, no longer granted) or an agent that cannot be reached starts
the grace period, as does an answer without a proper key (the watchdog fails closed); the key answering
again ends it; when ``grace_s`` has passed the watchdog calls ``on_lost`` with the reason, once, and
:func:`exit_now` is what engines pass as its end. The key bytes received are wiped at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from modelseal.crypto import keys
from modelseal.errors import KeyReleaseError
from modelseal.release.wire import ask

log = logging.getLogger("modelseal.leasewatch")
KEY_BYTES = 32
EXIT_KEY_LOST = 3
"""Exit status of an engine process stopped because its key was revoked or its lease ran out."""


def exit_now(message: str, code: int, cleanup: Callable[[], None] | None = None) -> None:
    """Say ``message`` on stderr (and in the log), run ``cleanup`` as far as it goes, and end the process
    with ``code`` whatever happens: the caller has decided the engine must not go on."""
    try:
        log.critical(message)
        print(message, file=sys.stderr, flush=True)
        if cleanup is not None:
            cleanup()
        logging.shutdown()
    finally:
        os._exit(code)


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
        self.problem: str | None = None  # why the key is not held now (None while it is)
        self.refused = False  # the problem is the agent's refusal (revoked, expired), not its silence
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _problem(self) -> str | None:
        self.refused = False
        for key_id, model in self.watched:
            try:
                _answer, key = ask(self.socket, {"op": "key", "key_id": key_id, "model": model}, timeout=30)
            except KeyReleaseError as exc:
                self.refused = exc.code != "agent_unavailable"
                return f"key {key_id} of model {model!r}: {exc.code}: {exc}"
            except Exception as exc:  # a malformed answer is no key: fail closed, never kill the watchdog
                return f"key {key_id} of model {model!r}: the agent's answer is unusable ({type(exc).__name__})"
            held = len(key) == KEY_BYTES
            keys.wipe(key)
            if not held:
                return f"key {key_id} of model {model!r}: the agent sent no key of {KEY_BYTES} bytes"
        return None

    def check(self) -> str | None:
        """One round: the reason to stop now, or None (the key is held, or the grace period runs)."""
        problem = self._problem()
        now = self.clock()
        self.problem = problem
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

    def stopped_reason(self) -> str | None:
        """Why an engine that is ending now ended without its key, or None: the agent refuses the key, or
        has not answered for about the grace period (an engine process's own watchdog counts its grace
        from its own checks, up to two of ours apart). A blip of silence is no reason: a Ctrl-C during
        one is an ordinary stop."""
        if self.problem is None:
            return None
        lasted = self.clock() - self.failing_since if self.failing_since is not None else 0.0
        return self.problem if self.refused or lasted >= self.grace_s - 2 * self.check_s else None

    def start(self) -> None:
        if self.check_s <= 0 or not self.watched or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="modelseal-leasewatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                reason = self.check()
            except Exception as exc:  # a bug here must not leave the engine running unwatched
                reason = f"the lease watchdog failed ({type(exc).__name__})"
            if reason is not None:
                self.on_lost(reason)
                return

    def stop(self) -> None:
        self._stop.set()
