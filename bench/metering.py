"""What licence metering costs a request in `modelseal serve`: one server (the agent as identity, the
agent keeping its signed usage log) serves each model twice, sealed to the key service under a grant
with a quota and a rate limit (metered: every request admitted and counted) and plaintext (not metered),
rounds alternating between the two.

Two figures:

- **In process**: the metering glue alone (``Metering.admit`` + ``Metering.done``, a real ``Meter`` holding
  a licence with every limit set), microseconds per request, median of rounds; and that as a ratio to
  the unmetered server's median request latency.
- **End to end**: median request latency (tritonclient gRPC and HTTP, one client, batch 1) metered over
  unmetered, each round's ratio, median over rounds. The same process serves both (decryption happens
  at load only, so the one difference per request is metering); this VM's speed drifts between rounds
  by more than the difference, so read it with the in-process figure.

    python bench/metering.py [--loop 200] [--rounds 5] [--json]

Models: ``tiny`` (a 4x3 MatMul: the worst case, where the request does almost nothing else) and ``cnn``
(the small CNN of ``bench/models.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from models import add_model, export_onnx, small_cnn

from modelseal.devstack import Agent, KeyServer, Serve
from modelseal.pki import identity_of_cert_file
from modelseal.release.meter import Licence, Meter
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.terms import Terms, Usage
from modelseal.serve.loadgen import Target, run
from modelseal.serve.metering import Metering
from modelseal.serve.metrics import Metrics

TERMS = {"max_requests": 10**12, "max_items": 10**12, "rate": 1e6}  # every limit checked, none reached


def tiny_onnx() -> bytes:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3])], [w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


def glue_us(iterations: int = 20_000) -> float:
    """Microseconds of one admit + done pair (one client; the licence has a quota and a rate limit)."""
    meter = Meter("/nonexistent/agent.sock")
    terms = Terms.from_json(TERMS)
    meter.licences = {"k1": Licence("k1", "m", "g1", terms, terms.period_start(time.time()), Usage())}
    metering = Metering(meter.socket, Metrics(), meter=meter)
    keys = {"k1"}
    started = time.perf_counter()
    for _ in range(iterations):
        charge = metering.admit("m", keys, "spki:client", 1)
        assert charge is not None
        metering.done(charge, answered=True)
    return (time.perf_counter() - started) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop", type=int, default=200, help="requests per round and target")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    glue = statistics.median(glue_us() for _ in range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        keyserver = KeyServer(tmp / "ks").start()
        agent = server = None
        try:
            with keyserver.admin() as admin:
                admin.call("POST", "/v1/admin/models", {"model": "bench"})
            recipients = [KeyserverRecipient(keyserver.url, "bench", token=keyserver.token, ca=keyserver.ca)]
            repo = tmp / "repo"
            models = {"tiny": (tiny_onnx(), (4,), 3), "cnn": (export_onnx(small_cnn(), (3, 16, 16)), (3, 16, 16), 10)}
            for name, (onnx_bytes, shape, classes) in models.items():
                add_model(repo, name, "onnxruntime_onnx", onnx_bytes, shape, classes, recipients=recipients)  # type: ignore[arg-type]
                add_model(repo, f"{name}_plain", "onnxruntime_onnx", onnx_bytes, shape, classes, recipients=None)
            host_cert = keyserver.host_cert("bench-host")
            spki = identity_of_cert_file(host_cert[0]).spki
            with keyserver.admin() as admin:
                admin.call("POST", "/v1/admin/grants", {"model": "bench", "identity": spki, "terms": TERMS})
            agent = Agent(keyserver, host_cert, tmp, usage_log=str(tmp / "usage.log")).start()
            server = Serve(repo, tmp / "serve.log", args=["-i", f"agent:{agent.socket}"]).start()
            rows = []
            for model in models:
                for protocol in ("grpc", "http"):
                    address = getattr(server, protocol)
                    targets = {"metered": Target(address, protocol, model),
                               "unmetered": Target(address, protocol, f"{model}_plain")}  # fmt: skip
                    p50: dict[str, list[float]] = {k: [] for k in targets}
                    for n in range(args.rounds):
                        for kind in list(targets) if n % 2 == 0 else reversed(list(targets)):
                            result = run(targets[kind], batch=1, concurrency=1, requests=args.loop)
                            assert not result["errors"], result
                            p50[kind].append(result["p50_ms"])
                    base = statistics.median(p50["unmetered"])
                    rows.append({
                        "model": model, "protocol": protocol,
                        "metered_p50_ms": statistics.median(p50["metered"]), "unmetered_p50_ms": base,
                        "latency_ratio": statistics.median(m / u for m, u in zip(p50["metered"], p50["unmetered"],
                                                                                 strict=True)),
                        "glue_ratio": glue / 1000 / base,
                    })  # fmt: skip
        finally:
            for process in (server, agent):
                if process is not None:
                    process.stop()
            keyserver.stop()
    report = {"glue_us": glue, "loop": args.loop, "rounds": args.rounds, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"admit + done: {glue:.2f} us per request (median of {args.rounds} rounds of 20,000)")
    print(f"{'model':6} {'proto':5} {'metered p50':>12} {'unmetered p50':>14} {'latency ratio':>14} {'glue ratio':>11}")
    for r in rows:
        print(f"{r['model']:6} {r['protocol']:5} {r['metered_p50_ms']:10.3f}ms {r['unmetered_p50_ms']:12.3f}ms "
              f"{r['latency_ratio']:14.3f} {r['glue_ratio']:11.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
