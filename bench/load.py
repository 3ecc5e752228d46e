"""Sealed vs plaintext load, same files, same run, page cache warm, medians.

Both sides are measured to *materialised* weights: ``safetensors.torch.load_file`` returns lazy
mmap-backed tensors in ~2 ms without reading them, so the plain baseline is ``load_file`` plus a copy
of every tensor into fresh memory, which is exactly what decryption must produce. A second scenario
loads into a freshly allocated ``nn.Module``: plain ``load_state_dict`` (copy) vs
``modelseal.torch.load_model`` (decrypt into fresh tensors, then ``assign=True``). A third measures
single-tensor random access against tensor size.

    python bench/load.py --size-mb 1024 --runs 7            # prints a table and ratios
    python bench/load.py --size-mb 1024 --json > out.json   # machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import modelseal
import modelseal.torch
from modelseal.crypto.parallel import worker_count
from modelseal.memory import arena
from modelseal.recipients.hpke import KEMS, HpkeIdentity

# gc.collect() before the timer, on both sides: with torch's ~170k objects alive, a full collection costs
# ~75 ms, and the import leaves one nearly due; whichever load's few hundred allocations tip it paid for it
# (a sealed load 1.1x plaintext in one build, 2x in the next, from ~300 objects more or less).
COLD = """
import gc, sys, time, torch, safetensors.torch, modelseal.torch
kind, path, key = sys.argv[1:4]
gc.collect()
t0 = time.perf_counter()
if kind == "plain":
    sd = {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}
else:
    sd = modelseal.torch.load_file(path, identity=key)
print(time.perf_counter() - t0)
"""


def cold_seconds(kind: str, path: Path, key: Path, runs: int) -> float:
    """Median first-load time in a fresh process (fresh memory, warm page cache): a server's start."""
    import subprocess
    import sys

    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD, kind, str(path), str(key)], capture_output=True, text=True, check=True
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up (page cache, allocator, thread pool)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return statistics.median(times)


class Stack(torch.nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="model size in MiB (default 1024)")
    ap.add_argument("--tensor-mb", type=int, default=16, help="size of each tensor in MiB (default 16)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--segment-kb", type=int, default=4096, help="segment size in KiB (default 4096)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the test files (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    dim = int((args.tensor_mb * (1 << 20) / 4) ** 0.5)
    n = max(1, args.size_mb // args.tensor_mb)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="modelseal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plain, sealed = work / "plain.safetensors", work / "sealed.safetensors"
    torch.manual_seed(0)
    model = Stack(n, dim)
    safetensors.torch.save_model(model, str(plain))
    del model
    ident = HpkeIdentity.generate(KEMS["x25519"])
    t0 = time.perf_counter()
    modelseal.seal(plain, sealed, [ident.recipient], segment_size=args.segment_kb << 10, force=True)
    seal_s = time.perf_counter() - t0
    size = plain.stat().st_size
    for p in (plain, sealed):  # warm the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass

    def plain_materialised() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in safetensors.torch.load_file(str(plain)).items()}

    def plain_into_arena() -> dict[str, torch.Tensor]:
        """The best a plain loader could do: one copy into the same arena modelseal uses."""
        lazy = safetensors.torch.load_file(str(plain))
        offsets, total = arena.layout([v.numel() * v.element_size() for v in lazy.values()])
        buf = arena.allocate(total)
        out = {}
        for (k, v), off in zip(lazy.items(), offsets, strict=True):
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=v.numel() * v.element_size(), offset=off)
            dst.copy_(v.view(-1).view(torch.uint8))
            out[k] = dst.view(v.dtype).reshape(v.shape)
        return out

    def sealed_load() -> dict[str, torch.Tensor]:
        return modelseal.torch.load_file(sealed, identity=ident)

    def fresh_module() -> Stack:
        with torch.device("meta"):
            m = Stack(n, dim)
        return m.to_empty(device="cpu")

    def plain_module() -> Stack:
        m = fresh_module()
        m.load_state_dict(safetensors.torch.load_file(str(plain)))
        return m

    def sealed_module() -> Stack:
        with torch.device("meta"):
            m = Stack(n, dim)
        modelseal.torch.load_model(m, sealed, identity=ident)
        return m

    check = sealed_load()
    ref = safetensors.torch.load_file(str(plain))
    assert all(torch.equal(check[k], ref[k]) for k in ref), "sealed load is not bit-exact"
    del check, ref

    rows: dict[str, float] = {
        "plain load_file + copy": median_seconds(plain_materialised, args.runs),
        "plain load_file + copy into the arena": median_seconds(plain_into_arena, args.runs),
        "sealed modelseal.torch.load_file": median_seconds(sealed_load, args.runs),
        "plain nn.Module load_state_dict": median_seconds(plain_module, args.runs),
        "sealed nn.Module load_model (assign)": median_seconds(sealed_module, args.runs),
    }
    key = work / "host.key"
    ident.save(key, force=True)
    rows["cold process: plain load_file + copy"] = cold_seconds("plain", plain, key, args.runs)
    rows["cold process: sealed load_file"] = cold_seconds("sealed", sealed, key, args.runs)
    ratio_cold = rows["cold process: sealed load_file"] / rows["cold process: plain load_file + copy"]
    ratio_tensors = rows["sealed modelseal.torch.load_file"] / rows["plain load_file + copy"]
    ratio_arena = rows["sealed modelseal.torch.load_file"] / rows["plain load_file + copy into the arena"]
    ratio_module = rows["sealed nn.Module load_model (assign)"] / rows["plain nn.Module load_state_dict"]

    # single-tensor random access vs tensor size, from one file holding tensors of several sizes
    sizes_kb = [4, 64, 1024, 16384]
    mixed = {f"t{s}": torch.randint(0, 255, (s << 10,), dtype=torch.uint8) for s in sizes_kb}
    mixed["filler"] = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8)
    mp, ms = work / "mixed.safetensors", work / "mixed.sealed.safetensors"
    safetensors.torch.save_file(mixed, str(mp))
    modelseal.seal(mp, ms, [ident.recipient], segment_size=args.segment_kb << 10, force=True)
    single = []
    with modelseal.safe_open(ms, "pt", identity=ident) as sf, safetensors.safe_open(str(mp), "pt") as pf:
        for s in sizes_kb:
            name = f"t{s}"
            p_s = median_seconds(lambda name=name: pf.get_tensor(name).clone(), args.runs * 3)
            s_s = median_seconds(lambda name=name: sf.get_tensor(name), args.runs * 3)
            single.append({"tensor_kib": s, "plain_ms": p_s * 1e3, "sealed_ms": s_s * 1e3, "ratio": s_s / p_s})

    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": worker_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "model_bytes": size,
        "tensors": n,
        "segment_kib": args.segment_kb,
        "runs": args.runs,
        "seconds_median": rows,
        "seal_seconds": seal_s,
        "seal_gb_per_s": size / seal_s / 1e9,
        "ratio_sealed_vs_plain_tensors": ratio_tensors,
        "ratio_sealed_vs_plain_module": ratio_module,
        "ratio_sealed_vs_plain_cold_process": ratio_cold,
        "ratio_sealed_vs_plain_same_allocator": ratio_arena,
        "sealed_gb_per_s": size / rows["sealed modelseal.torch.load_file"] / 1e9,
        "single_tensor": single,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"model {size / 2**30:.2f} GiB, {n} tensors, segments {args.segment_kb} KiB, {worker_count()} threads, "
        f"median of {args.runs}"
    )
    for k, v in rows.items():
        print(f"  {k:42s} {v * 1e3:9.1f} ms  ({size / v / 1e9:5.2f} GB/s)")
    print(f"  ratio sealed/plain (tensors): {ratio_tensors:.2f}x")
    print(f"  ratio sealed/plain copy into the same arena (pure crypto cost): {ratio_arena:.2f}x")
    print(f"  ratio sealed/plain (nn.Module): {ratio_module:.2f}x")
    print(f"  ratio sealed/plain (cold process, first load): {ratio_cold:.2f}x")
    print(f"  sealing: {seal_s:.2f} s ({size / seal_s / 1e9:.2f} GB/s)")
    print("  single-tensor access (file with a 256 MiB filler):")
    for r in single:
        print(
            f"    {r['tensor_kib']:>6} KiB: plain {r['plain_ms']:8.3f} ms, "
            f"sealed {r['sealed_ms']:8.3f} ms, {r['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
