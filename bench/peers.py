"""modelseal against the other ways to ship encrypted weights, same tensors, same run, medians.

Each load runs in a fresh process (page cache warm: every file was just written and read), alternating
with plaintext loads: ``plain ms`` is the median of those, ``x plain`` the median of each load's time over
its paired plaintext load's (this VM has phases when every load takes twice as long), timed inside
the child from the first byte read to every tensor materialised, with the child's peak RSS above its
post-import RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Methods:

- ``plain``: ``safetensors.torch.load_file`` + a copy of every tensor (plain load_file is a lazy mmap, so
  it must be materialised to compare with anything that decrypts);
- ``modelseal``: ``modelseal.torch.load_file`` of the sealed safetensors (AES-256-GCM, parallel);
- ``cryptotensors``: the PyPI peer (``cryptotensors.torch.load_file`` of its own encrypted file, AES-256-GCM
  with an Ed25519 signature, keys registered with its direct key provider);
- ``aes-cbc``: the seed article's approach: pycryptodome AES-256-CBC over a whole ``torch.save`` file,
  decrypted into a temporary file, then ``torch.load(weights_only=True)``.

Also per method and size: the time to write the file from the same tensors until it is on disk (sealing
throughput against ``safetensors.torch.save_file`` + ``fsync``, once; ``bench/seal.py`` measures it in
interleaved rounds) and the time to open the file and get one 16 MiB tensor (single-tensor access against
file size; the AES-CBC file has none).

    python bench/peers.py [--sizes 100,1024,4096] [--runs 5] [--skip aes-cbc] [--plot docs/peers.png] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import machine

CHILD = r"""
import json, os, sys, tempfile, time
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
import torch, safetensors.torch
method, path, secret = sys.argv[1:4]
if method == "modelseal":  # the host's identity is ready before the load, as cryptotensors' keys are
    import modelseal.torch
    from modelseal.recipients.registry import load_identity
    secret = load_identity(secret)
elif method == "cryptotensors":
    import cryptotensors, cryptotensors.torch
    cryptotensors.register_direct_key_provider(keys=json.loads(secret))
elif method == "aes-cbc":
    from Crypto.Cipher import AES
    from Crypto.Util.Padding import unpad
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports do not count
base = status("VmRSS")
import gc
gc.collect()  # as bench/load.py's COLD: a full collection the imports left due must not land in one method's time
t0 = time.perf_counter()
if method == "plain":
    sd = {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}
elif method == "modelseal":
    sd = modelseal.torch.load_file(path, identity=secret)
elif method == "cryptotensors":
    sd = cryptotensors.torch.load_file(path)
else:
    key = bytes.fromhex(secret)
    with open(path, "rb") as f:
        iv, data = f.read(16), f.read()
    plain = unpad(AES.new(key, AES.MODE_CBC, iv).decrypt(data), 16)
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        tmp.write(plain)
        tmp.flush()
        del plain, data
        sd = torch.load(tmp.name, weights_only=True)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
checksum = float(sum(float(v.view(-1)[0]) for v in sd.values()))
print(json.dumps({"seconds": seconds, "rss_mb": max(0, peak - base) / 1024, "n": len(sd), "check": checksum}))
"""


ONE = r"""
import json, statistics, sys, time
import safetensors
method, path, secret, name, runs = sys.argv[1:6]
if method == "modelseal":
    import modelseal
    from modelseal.recipients.registry import load_identity
    identity = load_identity(secret)
    opener = lambda: modelseal.safe_open(path, "pt", identity=identity)
elif method == "cryptotensors":
    import cryptotensors
    cryptotensors.register_direct_key_provider(keys=json.loads(secret))
    opener = lambda: cryptotensors.safe_open(path, "pt")
else:
    opener = lambda: safetensors.safe_open(path, "pt")
times = []
for _ in range(int(runs) + 1):
    t0 = time.perf_counter()
    with opener() as f:
        t = f.get_tensor(name).clone() if method == "plain" else f.get_tensor(name)
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times[1:])}))
"""
METHODS = ("plain", "modelseal", "cryptotensors", "aes-cbc")
ONE_TENSOR = ("plain", "modelseal", "cryptotensors")  # the AES-CBC file has no per-tensor access


def make_tensors(size_mb: int) -> dict[str, torch.Tensor]:
    tensor_mb = 16 if size_mb >= 256 else 4
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(tensor_mb * 256 * 1024, generator=g).view(-1, 1024)
            for i in range(max(1, size_mb // tensor_mb))}  # fmt: skip


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def durable(_: object, path: Path) -> None:
    """fsync ``path``: every write is timed until its data is on disk, as ``modelseal.seal`` returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cryptotensors_config() -> dict[str, dict[str, str]]:
    """Fresh keys for ``cryptotensors.torch.save_file``: an AES-256-GCM key and an Ed25519 signing key (JWK)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    signer = ed25519.Ed25519PrivateKey.generate()
    raw = (signer.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()),
           signer.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))  # fmt: skip
    enc = {"kty": "oct", "k": b64(os.urandom(32)), "alg": "aes256gcm", "kid": "bench-enc"}
    sign = {"kty": "okp", "crv": "Ed25519", "d": b64(raw[0]), "x": b64(raw[1]), "kid": "bench-sign",
            "alg": "ed25519"}  # fmt: skip
    return {"enc_key": enc, "sign_key": sign}


def make_file(method: str, directory: Path, plain: Path) -> tuple[Path, str, float]:
    """One method's file of the tensors in ``plain``: (path, secret the loader needs, seconds to write it)."""
    import safetensors.torch

    if method == "plain":
        tensors = safetensors.torch.load_file(str(plain))
        out = directory / "plain-copy.safetensors"
        seconds = timed(lambda: durable(safetensors.torch.save_file(tensors, str(out)), out))
        out.unlink()  # the timing was all that was wanted: loads use ``plain`` itself
        return plain, "", seconds
    if method == "modelseal":
        import modelseal
        from modelseal.recipients.hpke import KEMS, HpkeIdentity

        identity = HpkeIdentity.generate(KEMS["x25519"])
        key_file = directory / "host.key"
        identity.save(key_file, force=True)
        out = directory / "sealed.safetensors"
        return out, str(key_file), timed(lambda: modelseal.seal(plain, out, [identity.recipient], force=True))
    if method == "cryptotensors":
        import cryptotensors.torch

        config = cryptotensors_config()
        out = directory / "cryptotensors.safetensors"
        tensors = safetensors.torch.load_file(str(plain))
        seconds = timed(lambda: durable(cryptotensors.torch.save_file(tensors, str(out), config=config), out))
        return out, json.dumps([config["enc_key"], config["sign_key"]]), seconds
    from Crypto.Cipher import AES
    from Crypto.Util.Padding import pad

    tensors = safetensors.torch.load_file(str(plain))
    aes_key, iv = os.urandom(32), os.urandom(16)
    pt, out = directory / "plain.pt", directory / "aes-cbc.pt.enc"

    def seal_cbc() -> None:
        torch.save(tensors, pt)
        out.write_bytes(iv + AES.new(aes_key, AES.MODE_CBC, iv).encrypt(pad(pt.read_bytes(), 16)))
        pt.unlink()

    return out, aes_key.hex(), timed(seal_cbc)


def run_child(script: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    checks = {s["check"] for s in samples}
    return {
        "seconds": statistics.median(s["seconds"] for s in samples),
        "rss_mb": statistics.median(s["rss_mb"] for s in samples),
        "check": checks.pop() if len(checks) == 1 else None,
    }


def measure_size(size: int, methods: list[str], runs: int) -> list[dict[str, Any]]:
    """Every method at one size, each against plaintext loads interleaved with its own.

    Files are made one method at a time and deleted after use, so at most two copies of the model
    sit on disk and in the page cache (4 GiB runs fit a 24 GiB machine). Each method's runs alternate
    with plaintext runs, and its ratios use those plaintext runs: this VM has slow phases (every load
    taking twice as long for a while), which would otherwise land on one method and not another.
    """
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        plain = directory / "plain.safetensors"
        tensors = make_tensors(size)
        import safetensors.torch

        safetensors.torch.save_file(tensors, str(plain))
        nbytes, one = plain.stat().st_size, next(iter(tensors))
        del tensors
        plain_samples: list[dict[str, Any]] = []
        plain_write_s = make_file("plain", directory, plain)[2]
        plain_one = run_child(ONE, "plain", str(plain), "", one, str(max(runs, 5)))["seconds"]
        for method in (m for m in methods if m != "plain"):
            path, secret, write_s = make_file(method, directory, plain)
            for f in (plain, path):  # warm the page cache
                f.read_bytes()
            mine, theirs = [], []
            for _ in range(runs):
                theirs.append(run_child(CHILD, "plain", str(plain), ""))
                mine.append(run_child(CHILD, method, str(path), secret))
            plain_samples += theirs
            r, base = summarise(mine), summarise(theirs)
            r["write_gbps"] = nbytes / write_s / 1e9
            r["plain_s"] = base["seconds"]
            paired = zip(mine, theirs, strict=True)
            r["time_vs_plain"] = statistics.median(m["seconds"] / t["seconds"] for m, t in paired)
            r["rss_vs_plain"] = r["rss_mb"] / base["rss_mb"] if base["rss_mb"] else None
            if method in ONE_TENSOR:
                r["one_tensor_s"] = run_child(ONE, method, str(path), secret, one, str(max(runs, 5)))["seconds"]
            results[method] = r
            path.unlink()
        base = results["plain"] = summarise(plain_samples or [run_child(CHILD, "plain", str(plain), "")])
        base.update(write_gbps=nbytes / plain_write_s / 1e9, one_tensor_s=plain_one)
        base.update(time_vs_plain=1.0, rss_vs_plain=1.0, plain_s=base["seconds"])
    assert len({r["check"] for r in results.values()}) == 1, "the methods loaded different tensors"
    return [{"size_mb": size, "method": m, **r,
             "write_vs_plain": r["write_gbps"] / base["write_gbps"],
             "one_vs_plain": r["one_tensor_s"] / base["one_tensor_s"] if "one_tensor_s" in r else None}
            for m, r in sorted(results.items(), key=lambda kv: METHODS.index(kv[0]))]  # fmt: skip


def faster(speedup: float, than: str) -> str:
    return f"{speedup:.2f}x faster than {than}" if speedup >= 1 else f"{1 / speedup:.2f}x slower than {than}"


def ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if row.get(key) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1024,4096", help="model sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip", default="", help="methods to leave out, comma-separated (e.g. aes-cbc)")
    ap.add_argument("--plot", type=Path, help="write a PNG of load time and peak RSS per method and size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", type=Path, help="measure nothing: print (and plot) the rows of an earlier --json run")
    args = ap.parse_args()
    methods = [m for m in METHODS if m not in args.skip.split(",")]
    if args.rows:
        run = json.loads(args.rows.read_text())
    else:
        rows = [row for size in map(int, args.sizes.split(",")) for row in measure_size(size, methods, args.runs)]
        run = {"rows": rows, "runs": args.runs, "machine": machine()}
    rows = run["rows"]
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(run, indent=2))
        return
    print(f"fresh process per load, median of {run['runs']}; {run['machine']}")
    print(f"{'size':>6} {'method':14} {'load ms':>9} {'plain ms':>9} {'x plain':>8} {'peak RSS MB':>12} {'x plain':>8} "
          f"{'write GB/s':>11} {'x plain':>8} {'1 tensor ms':>12} {'x plain':>8}")  # fmt: skip
    for r in rows:
        one = f"{1000 * r['one_tensor_s']:.2f}" if "one_tensor_s" in r else "-"
        print(f"{r['size_mb']:>6} {r['method']:14} {1000 * r['seconds']:9.1f} {1000 * r['plain_s']:9.1f} "
              f"{r['time_vs_plain']:8.2f} "
              f"{r['rss_mb']:12.0f} {ratio(r, 'rss_vs_plain'):>8} {r['write_gbps']:11.2f} "
              f"{ratio(r, 'write_vs_plain'):>8} {one:>12} {ratio(r, 'one_vs_plain'):>8}")  # fmt: skip
    for size in sorted({r["size_mb"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size_mb"] == size}
        ms = by["modelseal"]["time_vs_plain"]  # each against its own interleaved plaintext runs
        parts = [faster(by[m]["time_vs_plain"] / ms, m) for m in ("cryptotensors", "aes-cbc") if m in by]
        print(f"{size} MiB: modelseal is " + " and ".join(parts))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'modelseal[bench]'): no plot", file=sys.stderr)
        return
    sizes = sorted({r["size_mb"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(sizes))]
        get = {r["size_mb"]: r for r in rows if r["method"] == method}
        bars = axes[0].bar(xs, [get[s]["time_vs_plain"] for s in sizes], width, label=method)
        axes[0].bar_label(bars, fmt="%.2f", fontsize=7)
        bars = axes[1].bar(xs, [get[s]["rss_vs_plain"] or 0 for s in sizes], width, label=method)
        axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
    for ax, title in zip(axes, ("load time / plaintext load", "peak RSS / plaintext load"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s} MiB" for s in sizes])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title)
    axes[0].set_yscale("log")  # the AES-CBC approach is 15-35x: a linear axis flattens the rest
    axes[0].set_title("load time / plaintext load (log scale)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
