"""A real ``tritonserver`` process (the one ``nvidia-pytriton`` ships), for the tests and ``bench/serve.py``.

PyTriton's wheel carries Triton 2.51 with its Python backend but keeps the backend stubs apart, one per
Python version; the server wants the stub beside ``libtriton_python.so``. So a private backend directory
is made of links (site-packages stays untouched), and the server gets the wheel's bundled libraries and
this Python's own lib directory (pyenv builds link libpython there) on ``LD_LIBRARY_PATH``. It listens on
loopback only (Triton binds 0.0.0.0 by default), in explicit model-control mode without exiting on a model
that fails to load, so one bad model is that model's error, not the end of the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path
from typing import Self

from modelseal.devstack import ModelsealProcess, free_port, wait_for
from modelseal.errors import MissingDependencyError


def tritonserver_root(env: str | None = None) -> Path:
    """The ``pytriton/tritonserver`` tree of the venv ``env`` (PyTriton pins numpy<2, so it often has a venv of
    its own; the tests and bench name it by ``$MODELSEAL_TRITON_ENV``), else of this Python."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if env:
        root = Path(env) / "lib" / version / "site-packages" / "pytriton" / "tritonserver"
    else:
        try:
            import pytriton
        except ImportError:
            root = Path("/nonexistent")
        else:
            root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise MissingDependencyError(f"no tritonserver in {root.parent.parent}: pip install nvidia-pytriton")
    return root


class TritonServer(ModelsealProcess):
    """``tritonserver`` serving ``repository`` (models named in ``models`` loaded at start), logging to ``log``;
    stopped (SIGTERM, then SIGKILL) like devstack's processes."""

    what = "tritonserver"

    def __init__(
        self, repository: Path, log: Path, models: list[str], *, venv: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(log, env)
        self.root = tritonserver_root(venv)
        self.repository, self.models = repository, models
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http, self.grpc = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:  # not `python -m modelseal`: start() runs the server binary itself
        return []

    def _backends(self) -> Path:
        backends = self.log.parent / f"{self.log.stem}-backends"
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        stub = self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        links = {**{n: self.root / "backends" / "python" / n for n in ("libtriton_python.so",
                                                                        "triton_python_backend_utils.py")},
                 "triton_python_backend_stub": stub / "triton_python_backend_stub"}  # fmt: skip
        for name, target in links.items():
            if not (python / name).exists():
                (python / name).symlink_to(target)
        return backends

    def start(self, timeout: float = 120) -> Self:
        libs = [str(self.root.parent.parent / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **self.env}
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        args = [str(self.root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={self._backends()}", "--model-control-mode=explicit", "--exit-on-error=false",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--exit-timeout-secs=5",
                *(f"--load-model={m}" for m in self.models)]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(self.ready, timeout, f"tritonserver (log: {self.log})")
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        if not self.running():  # raises StackError, naming the log's last line, once it has exited
            return False
        if "Started HTTPService" not in self.log.read_text(errors="replace"):
            return False
        try:  # the line comes just before the port accepts
            with urllib.request.urlopen(f"http://{self.http}/v2/health/live", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False
