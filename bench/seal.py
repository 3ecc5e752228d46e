"""Sealing throughput against writing the same tensors in plaintext, same run, interleaved rounds.

Each write runs in a fresh process, timed inside it from the first byte read to the output durable on
disk, with the source file warm in the page cache. Methods:

- ``plain``: ``safetensors.torch.save_file`` of the tensors (mapped from the plaintext file, as
  ``load_file`` returns them) followed by ``fsync`` of the output: what an owner's plaintext release costs;
- ``modelseal``: ``modelseal.seal`` of the plaintext file for one X25519 recipient (AES-256-GCM, 4 MiB
  segments, temporary file, fsync, rename, directory fsync);
- ``cryptotensors``: ``cryptotensors.torch.save_file`` of the same tensors (AES-256-GCM, Ed25519 signature)
  followed by ``fsync``, where the package is installed.

A round runs every method once, in an order that rotates from round to round, and deletes each output
right after its write; ``x plain`` is the median over rounds of the plaintext write's time divided by
the method's time in that round (throughput relative to plaintext: above 1 is faster). This VM has
slow phases (every write taking twice as long for a while), which the pairing keeps off the ratios.

    python bench/seal.py [--sizes 1024,4096] [--rounds 5] [--skip cryptotensors] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import machine
from peers import cryptotensors_config, make_tensors

METHODS = ("plain", "modelseal", "cryptotensors")

CHILD = r"""
import base64, gc, json, os, sys, time
import safetensors.torch
method, src, out, secret = sys.argv[1:5]
if method == "modelseal":
    import modelseal
    from modelseal.recipients import parse_recipient
    recipient = parse_recipient(secret)
elif method == "cryptotensors":
    import cryptotensors.torch
    config = json.loads(secret)
gc.collect()
t0 = time.perf_counter()
if method == "modelseal":
    modelseal.seal(src, out, [recipient])
else:
    tensors = safetensors.torch.load_file(src)  # mapped from the page cache, as for the plaintext save
    if method == "plain":
        safetensors.torch.save_file(tensors, out)
    else:
        cryptotensors.torch.save_file(tensors, out, config=config)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "bytes": os.path.getsize(out)}))
"""


def secrets_for(methods: list[str]) -> dict[str, str]:
    """What each method's child needs: a recipient for modelseal, keys for cryptotensors."""
    from modelseal.recipients.hpke import generate_identity

    out = {"plain": "", "modelseal": generate_identity().recipient.describe()}
    if "cryptotensors" in methods:
        out["cryptotensors"] = json.dumps(cryptotensors_config())
    return out


def write_once(method: str, src: Path, out: Path, secret: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(src), str(out), secret], capture_output=True, text=True
    )
    out.unlink(missing_ok=True)
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
    seconds: float = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return seconds


def measure_size(size: int, methods: list[str], rounds: int, directory: Path | None) -> list[dict[str, Any]]:
    """Every method once per round at ``size`` MiB; per-round ratios to that round's plaintext write."""
    import safetensors.torch

    keys = secrets_for(methods)
    times: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "plain.safetensors"
        safetensors.torch.save_file(make_tensors(size), str(src))
        nbytes = src.stat().st_size
        src.read_bytes()  # warm the page cache
        for r in range(rounds):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                times[m].append(write_once(m, src, Path(tmp) / f"out-{m}.safetensors", keys[m]))
    plain = times["plain"]
    return [
        {
            "size_mb": size,
            "method": m,
            "seconds": statistics.median(ts),
            "gbps": nbytes / statistics.median(ts) / 1e9,
            "x_plain": statistics.median(p / t for p, t in zip(plain, ts, strict=True)),
            "all_seconds": ts,
        }
        for m, ts in times.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options = {  # flag: (type, default, help)
        "--sizes": (str, "1024,4096", "model sizes in MiB, comma-separated"),
        "--rounds": (int, 5, "rounds of every method, interleaved"),
        "--skip": (str, "", "methods to leave out, comma-separated"),
        "--dir": (Path, None, "where to write (default: the system's temporary directory)"),
    }
    for flag, (kind, default, text) in options.items():
        ap.add_argument(flag, type=kind, default=default, help=text)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    methods = [m for m in METHODS if m not in args.skip.split(",")]
    if "cryptotensors" in methods:
        try:
            import cryptotensors  # noqa: F401
        except ImportError:
            methods.remove("cryptotensors")
    sizes = map(int, args.sizes.split(","))
    rows = [row for size in sizes for row in measure_size(size, methods, args.rounds, args.dir)]
    if args.json:
        print(json.dumps({"rows": rows, "rounds": args.rounds, "machine": machine()}, indent=2))
        return
    print(f"fresh process per write, output fsync'd, median of {args.rounds} interleaved rounds; {machine()}")
    print(f"{'size':>6} {'method':14} {'write ms':>9} {'GB/s':>6} {'x plain':>8}   every round (ms)")
    for r in rows:
        each = " ".join(f"{1000 * s:.0f}" for s in r["all_seconds"])
        print(f"{r['size_mb']:>6} {r['method']:14} {1000 * r['seconds']:9.1f} {r['gbps']:6.2f} "
              f"{r['x_plain']:8.2f}   {each}")  # fmt: skip
    for size in sorted({r["size_mb"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size_mb"] == size}
        if "cryptotensors" in by and "modelseal" in by:
            ratio = by["modelseal"]["x_plain"] / by["cryptotensors"]["x_plain"]
            print(f"{size} MiB: modelseal seals {ratio:.2f}x as fast as cryptotensors")


if __name__ == "__main__":
    main()
