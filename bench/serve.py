"""Serving cost of sealing: the same model, sealed and plaintext, served by the same `modelseal serve`
process in the same run, for each runtime asked for (ONNX Runtime: the chosen model; OpenVINO and TVM:
the test suite's tiny models, as their frameworks compile them), and the plaintext ONNX model behind a
plain FastAPI endpoint with the same runtime, and the sealed ONNX model through TF Serving's Predict on the
same server (``tfserving``: modelseal's load generator, not tritonclient); with ``--triton-env`` (a venv
holding nvidia-pytriton), the same sealed ONNX file in a real tritonserver through modelseal's
Python-backend model too.

This VM's speed drifts by more than the difference measured (identical work, sealed and plain, differs by
up to 20% between rounds), so each ratio is the median over rounds of that round's sealed / plain
throughput, measured back to back, the order alternating from round to round.

Every measurement uses the official tritonclient (``modelseal.serve.loadgen``): N concurrent clients each
sending R sequential requests of batch B. Rounds alternate between targets and are repeated; medians of
the rounds are reported, and the ratio sealed / plaintext (throughput; 1.0 = no cost).

    python bench/serve.py [--model resnet50|cnn] [--runtimes onnxruntime,openvino,tvm] [--batch 1]
                          [--cnum 1,4] [--loop 50] [--rounds 3] [--json]

The key comes from an identity file here (the key service and agent only matter at load time). On this
2-core machine the load generator shares the CPU with the server, as in the TF Serving article's setup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from models import add_model, export_onnx, resnet50, small_cnn

import modelseal
from modelseal.devstack import Serve, free_port, wait_for
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.serve.loadgen import Target, run

SHAPES = {"resnet50": ((3, 224, 224), 1000), "cnn": ((3, 16, 16), 10)}
RUNTIMES = ("onnxruntime", "openvino", "tvm")
ROOT = Path(__file__).resolve().parent.parent


def add_compiled(repo: Path, runtime: str, scratch: Path, recipient: Any) -> None:
    """``{runtime}_sealed`` and ``{runtime}_plain``: the test suite's tiny OpenVINO IR or TVM module, the
    same files sealed and plain, with configs completed from the model (none is written)."""
    sys.path.insert(0, str(ROOT))  # the test models (tests/openvino_models.py, tests/tvm_models.py)
    if runtime == "openvino":
        from tests.openvino_models import write_ir

        write_ir(scratch / "ir")
        plain, file_name = scratch / "ir", "model.xml"
    else:
        from tests.tvm_models import build_tiny

        build_tiny(scratch / "tvm")
        plain, file_name = scratch / "tvm", "model.tvm"
    version = repo / f"{runtime}_plain" / "1"
    if runtime == "openvino":  # Triton's OpenVINO layout: model.xml + model.bin in the version directory
        shutil.copytree(plain, version)
    else:  # a plain TVM export directory named model.tvm
        shutil.copytree(plain, version / file_name)
    (repo / f"{runtime}_sealed" / "1").mkdir(parents=True)
    modelseal.seal(plain, repo / f"{runtime}_sealed" / "1" / f"{file_name}.sealed", [recipient])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="resnet50", help="the ONNX Runtime model")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="runtimes to compare, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cnum", default="1,4", help="concurrency levels, comma-separated")
    parser.add_argument("--loop", type=int, default=50, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--triton-env", default=os.environ.get("MODELSEAL_TRITON_ENV"),
                        help="a venv with nvidia-pytriton: also serve the sealed ONNX model in tritonserver "
                             "through modelseal's Python-backend model (default $MODELSEAL_TRITON_ENV)")  # fmt: skip
    args = parser.parse_args()
    shape, classes = SHAPES[args.model]
    model = resnet50() if args.model == "resnet50" else small_cnn()
    onnx_bytes = export_onnx(model, shape)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        identity = HpkeIdentity.generate(KEMS["x25519"])
        identity.save(tmp / "host.key")
        repo = tmp / "repo"
        runtimes = [r for r in args.runtimes.split(",") if r]
        if "onnxruntime" not in runtimes or any(r not in RUNTIMES for r in runtimes):
            parser.error(f"--runtimes: onnxruntime and any of {', '.join(RUNTIMES[1:])}")
        add_model(repo, "onnxruntime_sealed", "onnxruntime_onnx", onnx_bytes, shape, classes,
                  recipients=[identity.recipient])  # fmt: skip
        add_model(repo, "onnxruntime_plain", "onnxruntime_onnx", onnx_bytes, shape, classes, recipients=None)
        for runtime in runtimes:
            if runtime != "onnxruntime":
                add_compiled(repo, runtime, tmp, identity.recipient)
        (tmp / "plain.onnx").write_bytes(onnx_bytes)
        server = Serve(repo, tmp / "serve.log", args=["-i", str(tmp / "host.key")]).start()
        triton = start_triton(args.triton_env, repo, tmp) if args.triton_env else None
        port = free_port()
        baseline = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fastapi_baseline.py")), str(tmp / "plain.onnx"), "plain",
             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: _ready(f"http://127.0.0.1:{port}/v2/health/ready"), 60, "the FastAPI baseline")
            targets = {
                ("modelseal", protocol, f"{runtime}_{kind}"): Target(address, protocol, f"{runtime}_{kind}")
                for runtime in runtimes for protocol, address in (("grpc", server.grpc), ("http", server.http))
                for kind in ("sealed", "plain")
            }
            targets["fastapi", "http", "onnxruntime_plain"] = Target(f"127.0.0.1:{port}", "http", "plain")
            # TF Serving's Predict on the same server and sealed model (its gRPC port)
            targets["modelseal", "tfserving", "onnxruntime_sealed"] = Target(server.grpc, "tfserving",
                                                                            "onnxruntime_sealed")  # fmt: skip
            if triton is not None:
                for protocol, address in (("grpc", triton.grpc), ("http", triton.http)):
                    targets["triton", protocol, "onnxruntime_sealed"] = Target(address, protocol, "onnxruntime_sealed")
            rows = []
            for cnum in (int(c) for c in args.cnum.split(",")):
                rounds: dict[tuple[str, str, str], list[dict[str, Any]]] = {k: [] for k in targets}
                for n in range(args.rounds):
                    for key in list(targets) if n % 2 == 0 else reversed(list(targets)):
                        rounds[key].append(run(targets[key], batch=args.batch, concurrency=cnum, requests=args.loop))
                for key, results in rounds.items():
                    rows.append({
                        "server": key[0], "protocol": key[1], "model": key[2], "cnum": cnum, "batch": args.batch,
                        "inferences_per_s": statistics.median(r["inferences_per_s"] for r in results),
                        "p50_ms": statistics.median(r["p50_ms"] for r in results),
                        "p99_ms": statistics.median(r["p99_ms"] for r in results),
                        "errors": sum(r["errors"] for r in results),
                        "rounds": [r["inferences_per_s"] for r in results],
                    })  # fmt: skip
        finally:
            server.stop()
            if triton is not None:
                triton.stop()
            baseline.terminate()
            baseline.wait(10)
    report = {"model": args.model, "rows": rows, "ratios": ratios(rows)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.model}, batch {args.batch}, {args.loop} requests per client, median of {args.rounds} rounds")
    print(f"{'server':10} {'proto':9} {'model':18} {'cnum':>4} {'inf/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['server']:10} {r['protocol']:9} {r['model']:18} {r['cnum']:4d} {r['inferences_per_s']:8.1f} "
              f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")  # fmt: skip
    for line in report["ratios"]:
        print(line)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    def find(server: str, protocol: str, model: str, cnum: int) -> dict[str, Any]:
        return next(
            r for r in rows if (r["server"], r["protocol"], r["model"], r["cnum"]) == (server, protocol, model, cnum)
        )

    out = []
    runtimes = sorted({r["model"].rsplit("_", 1)[0] for r in rows}, key=RUNTIMES.index)
    for cnum in sorted({r["cnum"] for r in rows}):
        for runtime in runtimes:
            for protocol in ("grpc", "http"):
                sealed = find("modelseal", protocol, f"{runtime}_sealed", cnum)
                plain = find("modelseal", protocol, f"{runtime}_plain", cnum)
                paired = statistics.median(s / p for s, p in zip(sealed["rounds"], plain["rounds"], strict=True))
                out.append(f"cnum {cnum} {protocol} {runtime}: sealed / plaintext throughput on modelseal serve = "
                           f"{paired:.3f} (median of per-round ratios)")  # fmt: skip
        fastapi = find("fastapi", "http", "onnxruntime_plain", cnum)
        ours = find("modelseal", "http", "onnxruntime_sealed", cnum)
        out.append(f"cnum {cnum} http: modelseal serve (sealed) / plain FastAPI throughput = "
                   f"{ours['inferences_per_s'] / fastapi['inferences_per_s']:.3f}")  # fmt: skip
        tfserving = find("modelseal", "tfserving", "onnxruntime_sealed", cnum)
        v2 = find("modelseal", "grpc", "onnxruntime_sealed", cnum)
        paired = statistics.median(t / v for t, v in zip(tfserving["rounds"], v2["rounds"], strict=True))
        out.append(f"cnum {cnum}: TF Serving Predict / V2 ModelInfer throughput, sealed model, modelseal serve's "
                   f"gRPC port = {paired:.3f} (median of per-round ratios)")  # fmt: skip
        for protocol in ("grpc", "http") if any(r["server"] == "triton" for r in rows) else ():
            triton = find("triton", protocol, "onnxruntime_sealed", cnum)
            ours = find("modelseal", protocol, "onnxruntime_sealed", cnum)
            paired = statistics.median(t / m for t, m in zip(triton["rounds"], ours["rounds"], strict=True))
            out.append(f"cnum {cnum} {protocol}: sealed model in tritonserver (modelseal's Python backend) / in "
                       f"modelseal serve throughput = {paired:.3f} (median of per-round ratios)")  # fmt: skip
    return out


def start_triton(venv: str, repo: Path, tmp: Path) -> Any:
    """tritonserver serving the same sealed ONNX file as ``onnxruntime_sealed``, laid out by triton-repo's
    library call (the stub runs in this Python's environment, key from the same identity file)."""
    from modelseal.triton.layout import Layout, lay_out
    from modelseal.triton.server import TritonServer

    key = str(tmp / "host.key")
    sealed = repo / "onnxruntime_sealed" / "1" / "model.onnx.sealed"
    lay_out(Layout(sealed, tmp / "triton-repo", "onnxruntime_sealed", identity=key, serve_identity=key,
                   max_batch_size=8))
    return TritonServer(tmp / "triton-repo", tmp / "triton.log", ["onnxruntime_sealed"], venv=venv).start()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
