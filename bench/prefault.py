"""What prefaulting destination pages buys: sealed load with and without it, against plaintext.

Each decryption worker maps a segment's destination pages with one ``MADV_POPULATE_WRITE`` call
before filling them (``modelseal/memory/arena.py``); ``MODELSEAL_PREFAULT=0`` turns that off. This runs the
three loads of ``bench/peers.py`` (fresh process each, page cache warm, timed in the child, peak RSS
above post-import RSS) round-robin, so machine noise hits all three alike, and prints medians.

    python bench/prefault.py [--sizes 100,1024] [--runs 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
from machine import machine
from peers import CHILD, make_file, make_tensors, run_child

VARIANTS = {  # name: (loader in peers.CHILD, environment)
    "plain": ("plain", {}),
    "sealed, prefault": ("modelseal", {"MODELSEAL_PREFAULT": "1"}),
    "sealed, page faults": ("modelseal", {"MODELSEAL_PREFAULT": "0"}),
}


def measure_size(size: int, runs: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.safetensors"
        safetensors.torch.save_file(make_tensors(size), str(plain))
        sealed, key = make_file("modelseal", Path(tmp), plain)[:2]
        for f in (plain, sealed):
            f.read_bytes()  # warm the page cache
        saved = dict(os.environ)
        try:
            for _ in range(runs):
                for name, (method, env) in VARIANTS.items():
                    os.environ.update(env)
                    path = plain if method == "plain" else sealed
                    samples[name].append(run_child(CHILD, method, str(path), key))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    assert len({s["check"] for v in samples.values() for s in v}) == 1, "the loads returned different tensors"
    med = {v: {"seconds": statistics.median(s["seconds"] for s in ss),
               "rss_mb": statistics.median(s["rss_mb"] for s in ss),
               "all_seconds": [s["seconds"] for s in ss]} for v, ss in samples.items()}  # fmt: skip
    base = med["plain"]
    for r in med.values():
        r["time_vs_plain"] = r["seconds"] / base["seconds"]
        r["rss_vs_plain"] = r["rss_mb"] / base["rss_mb"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1024", help="model sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {int(s): measure_size(int(s), args.runs) for s in args.sizes.split(",")}
    if args.json:
        print(json.dumps({"sizes": results, "machine": machine()}, indent=2))
        return
    print(f"fresh process per load, round-robin, median of {args.runs}; {machine()}")
    print(f"{'size':>6} {'variant':22} {'load ms':>9} {'x plain':>8} {'peak RSS MB':>12} {'x plain':>8}")
    for size, med in results.items():
        for name, r in med.items():
            print(f"{size:>6} {name:22} {1000 * r['seconds']:9.1f} {r['time_vs_plain']:8.2f} "
                  f"{r['rss_mb']:12.0f} {r['rss_vs_plain']:8.2f}")  # fmt: skip
        gain = med["sealed, page faults"]["seconds"] / med["sealed, prefault"]["seconds"]
        print(f"{size} MiB: prefaulting makes the sealed load {gain:.2f}x faster")


if __name__ == "__main__":
    main()
