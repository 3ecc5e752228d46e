"""modelseal against the other ways to ship encrypted weights, same tensors, same run, medians.

Each load runs in a fresh process (page cache warm: every file was just written and read), timed inside
the child from the first byte read to every tensor materialised, with the child's peak RSS above its
post-import RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Methods:

- ``plain``: ``safetensors.torch.load_file`` + a copy of every tensor (plain load_file is a lazy mmap, so
  it must be materialised to compare with anything that decrypts);
- ``modelseal``: ``modelseal.torch.load_file`` of the sealed safetensors (AES-256-GCM, parallel);
- ``cryptotensors``: the PyPI peer (``cryptotensors.torch.load_file`` of its own encrypted file, AES-256-GCM
  with an Ed25519 signature, keys registered with its direct key provider);
- ``aes-cbc``: the seed article's approach: pycryptodome AES-256-CBC over a whole ``torch.save`` file,
  decrypted into a temporary file, then ``torch.load(weights_only=True)``.

    python bench/peers.py [--sizes 100,1024] [--runs 5] [--plot docs/peers.png] [--json]
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
from pathlib import Path
from typing import Any

import torch

CHILD = r"""
import json, os, sys, tempfile, time
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
import torch, safetensors.torch
method, path, secret = sys.argv[1:4]
if method == "modelseal":
    import modelseal.torch
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


def make_files(directory: Path, size_mb: int) -> dict[str, tuple[Path, str]]:
    """The same tensors as plain safetensors, sealed safetensors, cryptotensors and AES-CBC torch.save."""
    import safetensors.torch
    from Crypto.Cipher import AES
    from Crypto.Util.Padding import pad
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    import modelseal
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    tensor_mb = 16 if size_mb >= 256 else 4
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(tensor_mb * 256 * 1024, generator=g).view(-1, 1024)
               for i in range(max(1, size_mb // tensor_mb))}  # fmt: skip
    plain = directory / f"plain-{size_mb}.safetensors"
    safetensors.torch.save_file(tensors, str(plain))

    identity = HpkeIdentity.generate(KEMS["x25519"])
    key_file = directory / "host.key"
    identity.save(key_file, force=True)
    sealed = directory / f"sealed-{size_mb}.safetensors"
    modelseal.seal(plain, sealed, [identity.recipient])

    import cryptotensors.torch

    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    signer = ed25519.Ed25519PrivateKey.generate()
    raw = (signer.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()),
           signer.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))  # fmt: skip
    enc = {"kty": "oct", "k": b64(os.urandom(32)), "alg": "aes256gcm", "kid": "bench-enc"}
    sign = {"kty": "okp", "crv": "Ed25519", "d": b64(raw[0]), "x": b64(raw[1]), "kid": "bench-sign", "alg": "ed25519"}
    crypto = directory / f"cryptotensors-{size_mb}.safetensors"
    cryptotensors.torch.save_file(tensors, str(crypto), config={"enc_key": enc, "sign_key": sign})

    aes_key, iv = os.urandom(32), os.urandom(16)
    pt = directory / f"plain-{size_mb}.pt"
    torch.save(tensors, pt)
    cbc = directory / f"aes-cbc-{size_mb}.pt.enc"
    cbc.write_bytes(iv + AES.new(aes_key, AES.MODE_CBC, iv).encrypt(pad(pt.read_bytes(), 16)))
    pt.unlink()
    return {
        "plain": (plain, ""),
        "modelseal": (sealed, str(key_file)),
        "cryptotensors": (crypto, json.dumps([enc, sign])),
        "aes-cbc": (cbc, aes_key.hex()),
    }


def measure(method: str, path: Path, secret: str, runs: int) -> dict[str, Any]:
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(path), secret],
                             capture_output=True, text=True, check=True)  # fmt: skip
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    checks = {s["check"] for s in samples}
    return {
        "seconds": statistics.median(s["seconds"] for s in samples),
        "rss_mb": statistics.median(s["rss_mb"] for s in samples),
        "check": checks.pop() if len(checks) == 1 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1024", help="model sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--plot", type=Path, help="write a PNG of load time and peak RSS per method and size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            files = make_files(Path(tmp), size)
            for path, _ in files.values():  # warm the page cache
                path.read_bytes()
            results = {m: measure(m, p, s, args.runs) for m, (p, s) in files.items()}
        assert len({r["check"] for r in results.values()}) == 1, "the methods loaded different tensors"
        base = results["plain"]
        for method, r in results.items():
            rows.append({"size_mb": size, "method": method, "seconds": r["seconds"], "rss_mb": r["rss_mb"],
                         "time_vs_plain": r["seconds"] / base["seconds"],
                         "rss_vs_plain": r["rss_mb"] / base["rss_mb"] if base["rss_mb"] else None})  # fmt: skip
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2))
        return
    print(f"fresh process per load, median of {args.runs}, {os.cpu_count()} CPUs")
    print(f"{'size':>6} {'method':14} {'load ms':>9} {'x plain':>8} {'peak RSS MB':>12} {'x plain':>8}")
    for r in rows:
        rss_ratio = f"{r['rss_vs_plain']:.2f}" if r["rss_vs_plain"] else "-"
        print(f"{r['size_mb']:>6} {r['method']:14} {1000 * r['seconds']:9.1f} {r['time_vs_plain']:8.2f} "
              f"{r['rss_mb']:12.0f} {rss_ratio:>8}")  # fmt: skip
    for size in sorted({r["size_mb"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size_mb"] == size}
        print(f"{size} MiB: modelseal is {by['cryptotensors']['seconds'] / by['modelseal']['seconds']:.2f}x faster "
              f"than cryptotensors and {by['aes-cbc']['seconds'] / by['modelseal']['seconds']:.2f}x faster than "
              f"AES-CBC + temp file + torch.load")  # fmt: skip


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
        axes[0].bar(xs, [get[s]["time_vs_plain"] for s in sizes], width, label=method)
        axes[1].bar(xs, [get[s]["rss_vs_plain"] or 0 for s in sizes], width, label=method)
    for ax, title in zip(axes, ("load time / plaintext load", "peak RSS / plaintext load"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s} MiB" for s in sizes])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
