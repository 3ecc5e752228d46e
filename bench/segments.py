"""How the segment size trades whole-file load speed against the cost of reading a little.

Every segment is authenticated whole, so reading one 4 KiB row costs decrypting its entire segment,
while a whole-file load pays a fixed cost per segment (cipher set-up, a tag, a job on the thread
pool). The same tensors are sealed at each size; per size, in one process, medians: a whole-file load
(``modelseal.torch.load_file``, destination memory reused), one 4 KiB row through ``get_slice``, and
the tag region's share of the file. The plaintext baseline for both is measured in the same run.

    python bench/segments.py [--size-mb 256] [--segments-kb 64,256,1024,4096,16384] [--runs 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

import modelseal
import modelseal.torch
from modelseal.recipients.hpke import KEMS, HpkeIdentity

ROW = 1024  # float32 columns: one row is 4 KiB


def median_s(fn: Callable[[], Any], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--segments-kb", default="64,256,1024,4096,16384")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(4096, ROW, generator=g) for i in range(args.size_mb // 16)}
    name, row = "t0", 2049  # a row in the middle of a tensor
    ident = HpkeIdentity.generate(KEMS["x25519"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.safetensors"
        safetensors.torch.save_file(tensors, str(plain))
        nbytes = plain.stat().st_size

        def plain_row() -> None:
            with safetensors.safe_open(str(plain), "pt") as f:
                f.get_slice(name)[row].clone()

        base_load = median_s(
            lambda: {k: v.clone() for k, v in safetensors.torch.load_file(str(plain)).items()}, args.runs
        )
        base_row = median_s(plain_row, args.runs * 10)
        for kb in (int(s) for s in args.segments_kb.split(",")):
            sealed = Path(tmp) / f"sealed-{kb}.safetensors"
            modelseal.seal(plain, sealed, [ident.recipient], segment_size=kb << 10, force=True)

            def sealed_row(path: Path = sealed) -> None:
                with modelseal.safe_open(path, "pt", identity=ident) as f:
                    f.get_slice(name)[row]

            load = median_s(lambda path=sealed: modelseal.torch.load_file(path, identity=ident), args.runs)
            one = median_s(sealed_row, args.runs * 10)
            rows.append({"segment_kb": kb, "load_s": load, "load_gbps": nbytes / load / 1e9, "row_s": one,
                         "load_vs_plain": load / base_load, "row_vs_plain": one / base_row,
                         "tag_share": (sealed.stat().st_size - nbytes) / nbytes})  # fmt: skip
            sealed.unlink()
    if args.json:
        print(json.dumps({"plain_load_s": base_load, "plain_row_s": base_row, "rows": rows}, indent=2))
        return
    print(f"{args.size_mb} MiB, medians; plain load {1000 * base_load:.1f} ms, plain 4 KiB row {1e6 * base_row:.0f} us")
    print(
        f"{'segment':>9} {'load ms':>9} {'GB/s':>6} {'x plain':>8} {'4 KiB row us':>13} {'x plain':>8} {'overhead':>9}"
    )
    for r in rows:
        print(f"{r['segment_kb']:>6} KiB {1000 * r['load_s']:9.1f} {r['load_gbps']:6.2f} {r['load_vs_plain']:8.2f} "
              f"{1e6 * r['row_s']:13.0f} {r['row_vs_plain']:8.1f} {100 * r['tag_share']:8.3f}%")  # fmt: skip


if __name__ == "__main__":
    main()
