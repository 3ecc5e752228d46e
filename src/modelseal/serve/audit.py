"""Per-request audit records: who (client certificate key) asked which model and version, and the outcome.

One JSON object per line, appended to a file (0600) or, without one, the ``modelseal.serve.audit`` log.
Records never hold tensor data, request ids chosen by clients, or key material.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("modelseal.serve.audit")


MAX_NAME = 200


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_NAME else f"{text[:MAX_NAME]}...({len(text)} characters)"


class AuditLog:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)

    def record(self, protocol: str, model: str, version: str, client: str, status: str, seconds: float) -> None:
        """``model`` and ``version`` are what the client asked for, cut to :data:`MAX_NAME` characters
        (a gRPC request may name a model of megabytes; the record keeps its start and its length)."""
        entry = {
            "ts": round(time.time(), 3),
            "protocol": protocol,
            "model": _bounded(model),
            "version": _bounded(version),
            "client": client,
            "status": status,
            "ms": round(seconds * 1000, 3),
        }
        line = json.dumps(entry, separators=(",", ":"))
        if self._file is None:
            log.info(line)
            return
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
