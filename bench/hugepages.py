"""Should the load arena ask for transparent huge pages? Fresh-process sealed loads of the same file,
alternating ``MODELSEAL_HUGEPAGES=1`` (``MADV_HUGEPAGE``) and the default (no advice); median and worst
of each, and the plain load + copy as the baseline, in the same run.

With THP ``defrag = madvise`` (the usual default, see /sys/kernel/mm/transparent_hugepage/defrag) an
advised region compacts memory synchronously on its first faults: fast when free huge pages exist,
stalls when memory is fragmented. Worst cases matter for a server's start.

    python bench/hugepages.py [--size-mb 1024] [--runs 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import COLD  # the same fresh-process load, timed in seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import safetensors.torch
    import torch

    import modelseal
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        g = torch.Generator().manual_seed(0)
        tensors = {f"t{i}": torch.randn(4 << 20, generator=g) for i in range(args.size_mb // 16)}
        safetensors.torch.save_file(tensors, str(tmp / "plain.safetensors"))
        del tensors
        identity = HpkeIdentity.generate(KEMS["x25519"])
        identity.save(tmp / "host.key")
        modelseal.seal(tmp / "plain.safetensors", tmp / "sealed.safetensors", [identity.recipient], force=True)
        cases = {
            "plain": ("plain", "plain.safetensors", "0"),
            "sealed, no advice (default)": ("sealed", "sealed.safetensors", "0"),
            "sealed, MADV_HUGEPAGE": ("sealed", "sealed.safetensors", "1"),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (kind, file, huge) in cases.items():
                out = subprocess.run(
                    [sys.executable, "-c", COLD, kind, str(tmp / file), str(tmp / "host.key")],
                    capture_output=True, text=True, check=True, env={**os.environ, "MODELSEAL_HUGEPAGES": huge},
                )  # fmt: skip
                times[name].append(1000 * float(out.stdout.strip().splitlines()[-1]))
    defrag = Path("/sys/kernel/mm/transparent_hugepage/defrag")
    report = {
        "size_mb": args.size_mb,
        "thp_defrag": defrag.read_text().strip() if defrag.exists() else None,
        "ms": {k: {"median": statistics.median(v), "max": max(v), "all": v} for k, v in times.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.size_mb} MiB, fresh process per load, {args.runs} alternating runs, THP defrag: {report['thp_defrag']}"
    )
    base = report["ms"]["plain"]["median"]
    for name, r in report["ms"].items():
        print(f"  {name:30} median {r['median']:7.1f} ms ({r['median'] / base:.2f}x plain), worst {r['max']:7.1f} ms")


if __name__ == "__main__":
    main()
