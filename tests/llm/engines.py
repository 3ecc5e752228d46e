"""vLLM processes for the LLM tests: ``LLM(...)`` runs (run_llm.py) and ``vllm serve`` servers.

Settings every run needs on these 2-core machines: a small share of memory for the KV cache (the CPU
backend reserves ``gpu_memory_utilization`` of RAM), eager mode, and one core per tensor-parallel rank.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from modelseal.devstack import free_port, wait_for

HERE = Path(__file__).parent
VLLM = [sys.executable, str(HERE / "vllm_cli.py")]  # the `vllm` command (see vllm_cli.py for why not BIN/vllm)


def vllm_env(tp: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND="|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)) if tp > 1 else "auto",
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        VLLM_LOGGING_COLOR="0", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.update(extra)
    return env


def run_llm(
    model: Path, *, prefix: Sequence[str] = (), timeout: float = 600, **opts: Any
) -> tuple[list[list[int]] | None, subprocess.CompletedProcess[str]]:
    """Greedy token ids of the prompts (None if the run failed) and the finished process."""
    cmd = [*prefix, sys.executable, str(HERE / "run_llm.py"), str(model), json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=vllm_env(opts.get("tp", 1)))
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    return (json.loads(found.group(1)) if found else None), proc


class VllmServer:
    """``vllm serve MODEL`` on a free loopback port, logging to ``log``."""

    def __init__(self, model: Path, log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            *VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--gpu-memory-utilization", "0.1",
            "--seed", "0", *args,
        ]  # fmt: skip
        self.out = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=vllm_env(**(env or {})))

    def wait_ready(self, timeout: float = 300) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "vllm serve")

    def complete(self, model: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)

    def text(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode
