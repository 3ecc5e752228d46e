"""vLLM's ``LLM(...)`` API with ``load_format="modelseal"``: sealed weights give the plain model's greedy
tokens, at TP=1 and TP=2 (each rank decrypting about half), without a byte of plaintext weights written
by any process of the vLLM tree; bad inputs stop vLLM with one clear line naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import modelseal
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .conftest import Llm
from .engines import VLLM, run_llm, vllm_env

STRACE = shutil.which("strace")
WRITES = "write,pwrite64,writev,pwritev,pwritev2"


def needles(model: Path) -> list[str]:
    """16-byte pieces of every weight tensor of ``model``, as strace -xx prints bytes."""
    found = []
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "numpy") as f:
            for name in f.keys():
                raw = f.get_tensor(name).tobytes()
                if len(raw) >= 64:
                    found.append("".join(f"\\x{b:02x}" for b in raw[32:48]))
    return found


def traced(trace: Path) -> list[str]:
    return ["strace", "-f", "-qq", "-xx", "-s", "1048576", "-e", f"trace={WRITES}", "-o", str(trace)]


def leaked(trace: Path, model: Path) -> list[str]:
    text = trace.read_text(errors="replace")
    return [n for n in needles(model) if n in text]


def test_sealed_equals_plain_and_no_process_writes_weights(llm: Llm, plain_ids: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    if STRACE is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("needs strace (scripts/test.sh installs it)")
    # the probe catches a process that writes the weights (the control), then watches the vLLM tree
    control = tmp_path / "control.trace"
    copy = "import sys; open(sys.argv[2],'wb').write(open(sys.argv[1],'rb').read())"
    shard = sorted(llm.plain.glob("*.safetensors"))[0]
    subprocess.run([*traced(control), sys.executable, "-c", copy, str(shard), str(tmp_path / "copy")], check=True)
    assert leaked(control, llm.plain), "the write probe does not see weights being written"

    staged_before = set(Path("/dev/shm").glob("modelseal-*"))
    trace = tmp_path / "vllm.trace"
    extra = {"identity": str(llm.key)}
    ids, proc = run_llm(llm.sealed, load_format="modelseal", extra=extra, prefix=traced(trace))
    assert ids == plain_ids, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(needles(llm.plain)) > 10
    assert leaked(trace, llm.plain) == []
    pids = {line.split()[0] for line in trace.read_text(errors="replace").splitlines() if line[:1].isdigit()}
    assert len(pids) >= 3  # the front process, the engine core and the worker were all traced
    assert set(Path("/dev/shm").glob("modelseal-*")) <= staged_before  # the staged config went with vLLM


def test_tensor_parallel_ranks_decrypt_their_shards(llm: Llm, plain_ids: list) -> None:  # type: ignore[type-arg]
    ids, proc = run_llm(llm.sealed, load_format="modelseal", extra={"identity": str(llm.key)}, tp=2)
    assert ids == plain_ids, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = re.findall(r"modelseal: rank (\d) of 2 decrypted (\d+) of (\d+) bytes", proc.stdout + proc.stderr)
    assert sorted(r[0] for r in reports) == ["0", "1"]
    for _rank, decrypted, total in reports:
        # the sharded matrices split in two; norms (replicated) are a few KiB of the 1.4 MB
        assert 0.45 < int(decrypted) / int(total) < 0.55


def vllm_serve_fails(model: Path, extra: dict, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[type-arg]
    cmd = [*VLLM, "serve", str(model), "--load-format", "modelseal",
           "--model-loader-extra-config", json.dumps(extra), "--port", "1", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=vllm_env())
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_bad_input_stops_vllm_with_one_line(llm: Llm, tmp_path: Path) -> None:
    other = HpkeIdentity.generate(KEMS["x25519"])
    other.save(tmp_path / "other.key")
    wrong = vllm_serve_fails(llm.sealed, {"identity": str(tmp_path / "other.key")})
    unwrap = r"modelseal: \S+: none of your identities .* can unwrap its data key"
    assert re.search(unwrap, wrong.stderr), wrong.stderr[-800:]

    missing = tmp_path / "missing"
    shutil.copytree(llm.sealed, missing)
    gone = sorted(missing.glob("*.safetensors"))[2]
    gone.unlink()
    proc = vllm_serve_fails(missing, {"identity": str(llm.key)})
    assert f"modelseal: {missing} is missing sealed files: {gone.name}" in proc.stderr

    mixed = tmp_path / "mixed"
    shutil.copytree(llm.sealed, mixed)
    swapped = sorted(mixed.glob("*.safetensors"))[0]
    shutil.copy(sorted(llm.plain.glob("*.safetensors"))[0], swapped)
    proc = vllm_serve_fails(mixed, {"identity": str(llm.key)})
    assert f"holds plain weight files ({swapped.name})" in proc.stderr and "allow_plain" in proc.stderr

    proc = vllm_serve_fails(llm.plain, {"identity": str(llm.key)})
    assert "holds no sealed file" in proc.stderr

    proc = vllm_serve_fails(llm.sealed, {"identiy": str(llm.key)})
    assert "unknown modelseal loader option(s) ['identiy']" in proc.stderr


def test_tampered_shard_is_refused_by_the_worker(llm: Llm, tmp_path: Path) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(llm.sealed, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1  # inside the last segment's ciphertext: only decryption can notice
    shard.write_bytes(bytes(data))
    ids, proc = run_llm(bad, load_format="modelseal", extra={"identity": str(llm.key)})
    assert ids is None and proc.returncode != 0
    assert re.search(rf"modelseal: {re.escape(str(shard))}.*(authentic|tamper)", proc.stdout + proc.stderr), (
        proc.stderr[-3000:]
    )


def test_plain_weights_load_only_when_allowed(llm: Llm, plain_ids: list) -> None:  # type: ignore[type-arg]
    ids, proc = run_llm(llm.plain, load_format="modelseal", extra={"allow_plain": True})
    assert ids == plain_ids, proc.stderr[-3000:]


def test_sealing_keeps_the_hf_layout(llm: Llm) -> None:
    sealed = sorted(p.name for p in llm.sealed.iterdir())
    assert sealed == sorted(p.name for p in llm.plain.iterdir())
    assert "model.safetensors.index.json" in sealed
    with modelseal.open_bundle(llm.sealed / "config.json", identity=llm.key) as b:
        assert json.loads(b.read())["model_type"] == "llama"
