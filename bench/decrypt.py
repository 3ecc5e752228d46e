"""The AES-256-GCM ceiling of this machine, and what the destination memory costs.

Every figure is decrypt-only (no file, no framework), medians, on the same ciphertext in one run:

* ``update_into`` (the loader's path: tag passed separately, straight into the destination) vs
  ``AESGCM.decrypt_into`` (needs ciphertext||tag contiguous, so each segment is copied first);
* 1 thread vs all threads (``cryptography`` >= 50 releases the GIL in both);
* destination: warm reused memory, fresh 4 KiB pages (``torch.empty``-like ``numpy.empty``), fresh
  huge-page-advised memory (``modelseal.memory.arena``); plus a plain copy into each, for the ratio.

    python bench/decrypt.py --size-mb 1024 --runs 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from machine import machine

from modelseal.crypto.parallel import worker_count
from modelseal.memory import arena

SEG = 4 << 20


def huge_pages(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = max(1, (args.size_mb << 20) // SEG)
    size = n * SEG
    key = AESGCM.generate_key(256)
    aead = AESGCM(key)
    plain = np.frombuffer(os.urandom(size), dtype=np.uint8)
    ct = bytearray(size)
    tags = []
    for i in range(n):
        out = aead.encrypt(i.to_bytes(12, "big"), memoryview(plain)[i * SEG : (i + 1) * SEG], None)
        ct[i * SEG : (i + 1) * SEG] = out[:-16]
        tags.append(out[-16:])
    ctv = memoryview(ct)

    def update_into(dst: memoryview, i: int) -> None:
        d = Cipher(algorithms.AES(key), modes.GCM(i.to_bytes(12, "big"), tags[i])).decryptor()
        o = i * SEG
        d.update_into(ctv[o : o + SEG - 15], dst[o : o + SEG])
        tail = bytearray(30)
        d.update_into(ctv[o + SEG - 15 : o + SEG], tail)
        dst[o + SEG - 15 : o + SEG] = tail[:15]
        d.finalize()

    def decrypt_into(dst: memoryview, i: int) -> None:
        buf = bytearray(SEG + 16)
        buf[:SEG] = ctv[i * SEG : (i + 1) * SEG]
        buf[SEG:] = tags[i]
        aead.decrypt_into(i.to_bytes(12, "big"), buf, None, dst[i * SEG : (i + 1) * SEG])

    warm = np.zeros(size, np.uint8)
    destinations: dict[str, Callable[[], memoryview]] = {
        "warm": lambda: memoryview(warm),
        "fresh 4 KiB pages": lambda: memoryview(np.empty(size, np.uint8)),
        "fresh arena (4 KiB pages)": lambda: memoryview(arena.allocate(size)),
        "fresh huge pages (MADV_HUGEPAGE)": lambda: memoryview(huge_pages(size)),
    }

    def gbps(fn: Callable[[memoryview, int], None], dest: Callable[[], memoryview], threads: int) -> float:
        times = []
        for _ in range(args.runs + 1):
            dst = dest()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(lambda i, dst=dst: fn(dst, i), range(n)))
            times.append(time.perf_counter() - t0)
            assert bytes(dst[:64]) == plain[:64].tobytes()
            del dst
        return size / statistics.median(times[1:]) / 1e9

    def copy_gbps(dest: Callable[[], memoryview]) -> float:
        times = []
        for _ in range(args.runs + 1):
            dst = np.frombuffer(dest(), dtype=np.uint8)
            t0 = time.perf_counter()
            np.copyto(dst, plain)
            times.append(time.perf_counter() - t0)
            del dst
        return size / statistics.median(times[1:]) / 1e9

    threads = worker_count()
    rows = {
        "update_into, 1 thread, warm": gbps(update_into, destinations["warm"], 1),
        f"update_into, {threads} threads, warm": gbps(update_into, destinations["warm"], threads),
        f"decrypt_into+copy, {threads} threads, warm": gbps(decrypt_into, destinations["warm"], threads),
    }
    for name, dest in destinations.items():
        if name != "warm":
            rows[f"update_into, {threads} threads, {name}"] = gbps(update_into, dest, threads)
    copies = {f"plain copy, {name}": copy_gbps(dest) for name, dest in destinations.items()}
    report = {"bytes": size, "segment": SEG, "threads": threads, "machine": machine(), "gb_per_s": {**rows, **copies}}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{size / 2**30:.2f} GiB in {n} segments of {SEG >> 20} MiB, median of {args.runs}; {machine()}")
    for k, v in {**rows, **copies}.items():
        print(f"  {k:50s} {v:6.2f} GB/s")


if __name__ == "__main__":
    main()
