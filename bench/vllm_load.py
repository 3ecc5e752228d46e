"""vLLM weight loading, same run, same model, fresh processes, interleaved: plain safetensors (vLLM's
default loader), modelseal (``--load-format modelseal``) and tensorizer with encryption (``--load-format
tensorizer`` with an encryption key; libsodium from Debian's libsodium23).

Per round and format, a fresh process builds ``LLM(...)`` in-process (no engine subprocess, so the load
can be timed exactly) and reports:
- load: vLLM's ``get_model`` (model construction, weight loading, post-processing), the same span for all;
- first token: process start to the first generated token (imports, engine start, load, one decode step).
Medians over the rounds, ratios against plain from the same run. Then one TP=2 modelseal run reports the
bytes each rank decrypted.

tensorizer 2.12.1 cannot encrypt a vLLM 0.32 CPU model: its serializer fails on zero-size tensors when
encrypting (IndexError in _write_tensor; vLLM's CPU model has some), so on these machines the run says
so and goes on without it; bench/peers.py compares encrypted tensorizer at the loader level instead.

Run in .venv-vllm:  .venv-vllm/bin/python bench/vllm_load.py [--size-mib 1024] [--rounds 5] [--lazy]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, os, sys, time
t0 = float(sys.argv[3])
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
import vllm.v1.worker.cpu_model_runner as runner
spans = []
inner = runner.get_model
def timed(*a, **k):
    s = time.perf_counter(); m = inner(*a, **k); spans.append(time.perf_counter() - s); return m
runner.get_model = timed
if __name__ == "__main__":
    opts = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, gpu_memory_utilization=0.2,
              distributed_executor_backend="uni", **opts)
    llm.generate(["w1 w2 w3"], SamplingParams(temperature=0, max_tokens=1))
    print("RESULT " + json.dumps({"load": spans[0], "first_token": time.time() - t0}), flush=True)
"""


def bench_model(root: Path, size_mib: int) -> Path:
    """A random Llama of about ``size_mib`` MiB (float32), made once and kept."""
    import llms

    hidden, inter = 2048, 5632
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    layers = max(1, round(size_mib * 2**20 / per_layer))
    path = root / f"llama-{layers}x{hidden}"
    if not (path / "config.json").exists():
        llms.llama(path, hidden=hidden, layers=layers, heads=16, kv_heads=16, intermediate=inter, shard_size="500MB")
    return path


def env() -> dict[str, str]:
    return dict(os.environ, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(model: Path, opts: dict[str, object]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), json.dumps(opts), repr(time.time())],
        capture_output=True, text=True, env=env(), timeout=1800,
    )  # fmt: skip
    found = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if not found:
        raise SystemExit(f"run failed ({opts.get('load_format')}):\n{proc.stderr[-4000:]}")
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def prepare(root: Path, plain: Path, lazy: bool) -> dict[str, tuple[Path, dict[str, object]]]:
    import modelseal
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    key = root / "host.key"
    if not key.exists():
        HpkeIdentity.generate(KEMS["x25519"]).save(key)
    sealed = root / (plain.name + ".sealed")
    if not sealed.exists():
        modelseal.seal(plain, sealed, [modelseal.load_identity(str(key)).recipient])  # type: ignore[attr-defined]
    formats: dict[str, tuple[Path, dict[str, object]]] = {
        "plain": (plain, {}),
        "modelseal": (sealed, {"load_format": "modelseal", "model_loader_extra_config": {"identity": str(key)}}),
    }
    if lazy:  # the tensor-parallel path (decrypt straight into each parameter) at TP=1 too
        extra = {"identity": str(key), "lazy": True}
        formats["modelseal (lazy)"] = (sealed, {"load_format": "modelseal", "model_loader_extra_config": extra})
    tensorized = root / (plain.name + ".tensors")
    keyfile = root / "tensorizer.key"
    try:
        from vllm.model_executor.model_loader.tensorizer import TensorizerConfig  # noqa: F401
    except ImportError:
        return formats
    if not tensorized.exists() or not keyfile.exists():
        serialize = (
            "import sys\nfrom vllm.engine.arg_utils import EngineArgs\n"
            "from vllm.model_executor.model_loader.tensorizer import TensorizerConfig, tensorize_vllm_model\n"
            "if __name__ == '__main__':\n"
            "    args = EngineArgs(model=sys.argv[1], dtype='float32', max_model_len=128, enforce_eager=True,"
            " gpu_memory_utilization=0.2)\n"
            "    config = TensorizerConfig(tensorizer_uri=sys.argv[2], encryption_keyfile=sys.argv[3])\n"
            "    tensorize_vllm_model(args, config)\n"
        )
        cmd = [sys.executable, "-c", serialize, str(plain), str(tensorized), str(keyfile)]
        made = subprocess.run(cmd, capture_output=True, text=True, env=env())
        if made.returncode != 0:
            tensorized.unlink(missing_ok=True)
            why = re.findall(r"^.*(?:Error|Exception): .*$", made.stdout + made.stderr, re.M)
            print(f"tensorizer (encrypted): cannot serialize the vLLM model: {why[-1] if why else 'failed'}")
            return formats
    extra = {"tensorizer_uri": str(tensorized), "encryption_keyfile": str(keyfile)}
    formats["tensorizer (encrypted)"] = (plain, {"load_format": "tensorizer", "model_loader_extra_config": extra})
    return formats


def tp2_bytes(sealed: Path, key: Path) -> list[str]:
    child = (
        "import sys, json\nfrom vllm import LLM\n"
        "if __name__ == '__main__':\n"
        "    LLM(model=sys.argv[1], dtype='float32', max_model_len=128, enforce_eager=True, gpu_memory_utilization=0.2,"
        " tensor_parallel_size=2, load_format='modelseal', model_loader_extra_config={'identity': sys.argv[2]})\n"
    )
    e = dict(env(), VLLM_CPU_OMP_THREADS_BIND="0|1")
    proc = subprocess.run([sys.executable, "-c", child, str(sealed), str(key)], capture_output=True, text=True, env=e)
    return re.findall(r"modelseal: rank \d of 2 decrypted \d+ of \d+ bytes \([\d.]+%\)", proc.stdout + proc.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/modelseal-bench-vllm"))
    ap.add_argument("--lazy", action="store_true", help="also time the loader's lazy path at TP=1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    plain = bench_model(args.dir, args.size_mib)
    size = sum(p.stat().st_size for p in plain.glob("*.safetensors"))
    formats = prepare(args.dir, plain, args.lazy)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in formats}
    for _ in range(args.rounds):
        for name, (model, opts) in formats.items():  # interleaved: each round runs every format once
            results[name].append(run(model, opts))
    summary = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("load", "first_token")}
        for name, runs in results.items()
    }
    base = summary["plain"]
    tp2 = tp2_bytes(formats["modelseal"][0], args.dir / "host.key")
    if args.json:
        print(json.dumps({"weights_bytes": size, "rounds": args.rounds, "median_s": summary, "tp2": tp2}))
        return
    print(f"vLLM {size / 2**30:.2f} GiB float32 Llama, {args.rounds} rounds, fresh processes, medians")
    print(f"{'format':26} {'load s':>8} {'x plain':>8} {'first token s':>14} {'x plain':>8}")
    for name, s in summary.items():
        print(
            f"{name:26} {s['load']:8.2f} {s['load'] / base['load']:8.2f} "
            f"{s['first_token']:14.2f} {s['first_token'] / base['first_token']:8.2f}"
        )
    print("TP=2, bytes decrypted per rank: " + "; ".join(tp2))


if __name__ == "__main__":
    main()
