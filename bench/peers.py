"""modelseal against the other ways to ship encrypted weights, same tensors, same run, medians.

Each load runs in a fresh process (page cache warm: every file was just written and read), alternating
with plaintext loads: ``plain ms`` is the median of those, ``x plain`` the median of each load's time over
its paired plaintext load's (this VM has phases when every load takes twice as long), timed inside
the child from the first byte read to every tensor materialised, with the child's peak RSS above its
post-import RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Every child times three
loads of the same file (``torch`` is imported first in all of them, and its leftover garbage collected):

- ``load``: the first load, the method's modules imported and its key ready before the clock starts;
- ``cold``: the method's imports and key set-up (modelseal's identity file, cryptotensors' key
  registration, ``safetensors.torch`` for plaintext) plus that first load: what a user's first load in a
  new process pays;
- ``warm``: the same load again in the same process, the first result freed (a reload).

Children may write bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped for them) and one untimed child per
method runs first, so no timed import compiles source (an installed package ships compiled bytecode).
Methods:

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

Models below 64 MiB are made of 1 MiB tensors (one segment each), 64-255 MiB of 4 MiB tensors, larger
ones of 16 MiB tensors.

    python bench/peers.py [--sizes 1,8,16,100,1024] [--runs 9] [--skip aes-cbc] [--plot docs/peers.png] [--json]
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
import json, os, sys, tempfile, time, gc
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
import torch
torch.empty(1 << 20).add_(1)  # torch's own first-op set-up (its intra-op thread pool too) is nobody's load
gc.collect()  # and the full collection its import left due is nobody's either (see bench/load.py's COLD)
method, path, secret = sys.argv[1:4]
clock = time.perf_counter
t_cold = clock()
import safetensors.torch
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
setup = clock() - t_cold
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
def load():
    if method == "plain":
        return {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}
    if method == "modelseal":
        return modelseal.torch.load_file(path, identity=secret)
    if method == "cryptotensors":
        return cryptotensors.torch.load_file(path)
    key = bytes.fromhex(secret)
    with open(path, "rb") as f:
        iv, data = f.read(16), f.read()
    plain = unpad(AES.new(key, AES.MODE_CBC, iv).decrypt(data), 16)
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        tmp.write(plain)
        tmp.flush()
        del plain, data
        return torch.load(tmp.name, weights_only=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports do not count
base = status("VmRSS")
gc.collect()  # a full collection the imports left due must not land in one method's time
t0 = clock()
sd = load()
seconds = clock() - t0
peak = status("VmHWM")
checksum = float(sum(float(v.view(-1)[0]) for v in sd.values()))
del sd
t0 = clock()
sd = load()
warm = clock() - t0
print(json.dumps({"seconds": seconds, "cold": setup + seconds, "warm": warm, "rss_mb": max(0, peak - base) / 1024,
                  "n": len(sd), "check": checksum}))
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
METHODS = ("plain", "modelseal", "modelseal-base", "cryptotensors", "aes-cbc")
ONE_TENSOR = ("plain", "modelseal", "cryptotensors")  # the AES-CBC file has no per-tensor access


def make_tensors(size_mb: int) -> dict[str, torch.Tensor]:
    tensor_mb = 16 if size_mb >= 256 else 4 if size_mb >= 64 else 1
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


# Children may write bytecode: an installed modelseal ships compiled, and a cold import must not compile source.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_child(script: str, *args: str, src: str | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; ``src``: import modelseal from that source tree instead."""
    env = CHILD_ENV if src is None else {**CHILD_ENV, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    checks = {s["check"] for s in samples}
    return {
        "seconds": statistics.median(s["seconds"] for s in samples),
        "cold_s": statistics.median(s["cold"] for s in samples),
        "warm_s": statistics.median(s["warm"] for s in samples),
        "rss_mb": statistics.median(s["rss_mb"] for s in samples),
        "check": checks.pop() if len(checks) == 1 else None,
    }


FIELDS = (("time_vs_plain", "seconds"), ("cold_vs_plain", "cold"), ("warm_vs_plain", "warm"))
ROUND_ROBIN_MAX = 1024  # MiB: up to here every method's file is on disk at once and each round runs them all
BASE = "modelseal-base"  # modelseal from --baseline-src: the same sealed file, read by another build


def measure_size(size: int, methods: list[str], runs: int, base_src: str | None = None) -> list[dict[str, Any]]:
    """Every method at one size, each load time over a plaintext load's from the same round.

    Up to ``ROUND_ROBIN_MAX`` every method's file is made first and each round loads every method once
    (plaintext included) in an order that rotates, so ratios, ``x plain`` and modelseal against each peer
    (``vs``), are medians of pairs from one round: this VM has slow phases (every load taking twice as
    long for a while) that would otherwise land on one method and not another. Larger models are done
    one method at a time, each method's runs alternating with plaintext runs, and its file deleted after
    use, so at most two copies of the model sit on disk and in the page cache (4 GiB runs fit a 24 GiB
    machine).
    """
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        plain = directory / "plain.safetensors"
        tensors = make_tensors(size)
        import safetensors.torch

        safetensors.torch.save_file(tensors, str(plain))
        nbytes, one = plain.stat().st_size, next(iter(tensors))
        del tensors
        plain_write_s = make_file("plain", directory, plain)[2]
        plain_one = run_child(ONE, "plain", str(plain), "", one, str(max(runs, 5)))["seconds"]
        files: dict[str, tuple[Path, str, float | None]] = {"plain": (plain, "", plain_write_s)}

        def make(method: str) -> None:
            if method == BASE:
                files[BASE] = (*files["modelseal"][:2], None)  # the same file: only the reader differs
            elif method != "plain":
                files[method] = make_file(method, directory, plain)
            for f in {plain, files[method][0]}:  # warm the page cache, compile bytecode
                f.read_bytes()
            run_child(CHILD, *child_args(method), src=base_src if method == BASE else None)

        def load(method: str) -> dict[str, Any]:
            return run_child(CHILD, *child_args(method), src=base_src if method == BASE else None)

        def child_args(method: str) -> tuple[str, str, str]:
            path, secret, _w = files[method]
            return ("modelseal" if method == BASE else method, str(path), secret)

        others = [m for m in methods if m != "plain"]
        if size <= ROUND_ROBIN_MAX:
            for method in ["plain", *others]:
                make(method)
            rounds = []
            order = ["plain", *others]
            for i in range(runs):
                k = i % len(order)
                rounds.append({m: load(m) for m in order[k:] + order[:k]})
            for method in order:
                samples[method] = [r[method] for r in rounds]
            pairs = {m: [(r[m], r["plain"]) for r in rounds] for m in order}
            versus = {peer: [(r[peer], r["modelseal"]) for r in rounds] for peer in others if "modelseal" in order}
        else:
            pairs, versus = {}, {}
            for method in others:
                make(method)
                mine, theirs = [], []
                for _ in range(runs):
                    theirs.append(load("plain"))
                    mine.append(load(method))
                samples[method] = mine
                samples.setdefault("plain", []).extend(theirs)
                pairs[method] = list(zip(mine, theirs, strict=True))
                if method != BASE and not (method == "modelseal" and BASE in others):
                    files[method][0].unlink()
            pairs["plain"] = [(t, t) for t in samples["plain"]]
        for method, got in samples.items():
            r = results[method] = summarise(got)
            theirs = [t for _m, t in pairs[method]]
            base = summarise(theirs)
            for key, field in FIELDS:
                r[key] = statistics.median(m[field] / t[field] for m, t in pairs[method])
            r.update(plain_s=base["seconds"], plain_cold_s=base["cold_s"], plain_warm_s=base["warm_s"])
            r["rss_vs_plain"] = r["rss_mb"] / base["rss_mb"] if base["rss_mb"] else None
            write_s = files[method][2] if method in files else None
            r["write_gbps"] = nbytes / write_s / 1e9 if write_s else None
            if method in versus:  # modelseal's speedup over this peer, round by round
                for key, field in FIELDS:
                    r[key.replace("vs_plain", "ms_speedup")] = statistics.median(
                        p[field] / m[field] for p, m in versus[method]
                    )
            if method == "plain":
                r["one_tensor_s"] = plain_one
            elif method in ONE_TENSOR or method == BASE:
                path, secret, _w = files[method]
                r["one_tensor_s"] = run_child(
                    ONE, child_args(method)[0], str(path), secret, one, str(max(runs, 5)),
                    src=base_src if method == BASE else None,
                )["seconds"]  # fmt: skip
    assert len({r["check"] for r in results.values()}) == 1, "the methods loaded different tensors"
    plain_row = results["plain"]
    return [{"size_mb": size, "method": m, **r,
             "write_vs_plain": r["write_gbps"] / plain_row["write_gbps"] if r.get("write_gbps") else None,
             "one_vs_plain": r["one_tensor_s"] / plain_row["one_tensor_s"] if "one_tensor_s" in r else None}
            for m, r in sorted(results.items(), key=lambda kv: METHODS.index(kv[0]))]  # fmt: skip


def faster(speedup: float, than: str) -> str:
    return f"{speedup:.2f}x faster than {than}" if speedup >= 1 else f"{1 / speedup:.2f}x slower than {than}"


def ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if row.get(key) else "-"


def ms(row: dict[str, Any], key: str) -> str:
    return f"{1000 * row[key]:.1f}" if row.get(key) is not None else "-"


KINDS = (("load", "time_vs_plain"), ("cold", "cold_vs_plain"), ("warm", "warm_vs_plain"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,8,16,100,1024", help="model sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip", default="", help="methods to leave out, comma-separated (e.g. aes-cbc)")
    ap.add_argument("--plot", type=Path, help="write a PNG of load time against plaintext per method and size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline-src", help="also load with modelseal imported from this source tree (the src/ "
                    "of a worktree at an earlier commit), as method modelseal-base: before/after in one run")
    ap.add_argument("--rows", type=Path, nargs="+", help="measure nothing: print (and plot) earlier --json runs' rows")
    args = ap.parse_args()
    methods = [m for m in METHODS if m not in args.skip.split(",") and (m != BASE or args.baseline_src)]
    if args.rows:  # several runs (e.g. the small sizes and 4 GiB, run apart) are shown together
        runs = [json.loads(f.read_text()) for f in args.rows]
        run = {"rows": [r for one in runs for r in one["rows"]], "runs": "/".join(str(one["runs"]) for one in runs),
               "machine": runs[0]["machine"]}  # fmt: skip
    else:
        sizes = map(int, args.sizes.split(","))
        rows = [row for size in sizes for row in measure_size(size, methods, args.runs, args.baseline_src)]
        run = {"rows": rows, "runs": args.runs, "machine": machine(), "baseline_src": args.baseline_src}
    rows = run["rows"]
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(run, indent=2))
        return
    print(f"fresh process per load, median of {run['runs']}; {run['machine']}")
    print(f"{'size':>6} {'method':14} {'load ms':>9} {'plain ms':>9} {'x plain':>8} {'cold ms':>9} {'x plain':>8} "
          f"{'warm ms':>9} {'x plain':>8} {'peak RSS MB':>12} {'x plain':>8} {'write GB/s':>11} {'x plain':>8} "
          f"{'1 tensor ms':>12} {'x plain':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['size_mb']:>6} {r['method']:14} {ms(r, 'seconds'):>9} {ms(r, 'plain_s'):>9} "
              f"{ratio(r, 'time_vs_plain'):>8} {ms(r, 'cold_s'):>9} {ratio(r, 'cold_vs_plain'):>8} "
              f"{ms(r, 'warm_s'):>9} {ratio(r, 'warm_vs_plain'):>8} "
              f"{r['rss_mb']:12.0f} {ratio(r, 'rss_vs_plain'):>8} {ratio(r, 'write_gbps'):>11} "
              f"{ratio(r, 'write_vs_plain'):>8} {ms(r, 'one_tensor_s'):>12} {ratio(r, 'one_vs_plain'):>8}")  # fmt: skip
    for size in sorted({r["size_mb"] for r in rows}):
        by = {r["method"]: r for r in rows if r["size_mb"] == size}
        for kind, key in KINDS:
            if not by.get("modelseal", {}).get(key):
                continue
            mine, parts = by["modelseal"][key], []
            for peer in (BASE, "cryptotensors", "aes-cbc"):
                row = by.get(peer, {})
                direct = row.get(key.replace("vs_plain", "ms_speedup"))  # paired within each round
                if direct:
                    parts.append(faster(direct, peer))
                elif row.get(key):  # runs apart: the ratio of the two ratios to plaintext
                    parts.append(faster(row[key] / mine, peer) + " (ratio of ratios)")
            print(f"{size} MiB, {kind}: modelseal {mine:.2f}x plain; " + "; ".join(parts))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Load time over plaintext against model size, one line per method: the first load in a fresh
    process, the cold one (imports and key set-up included) and the warm one (a second load)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'modelseal[bench]'): no plot", file=sys.stderr)
        return
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "plain"]
    kinds = [(kind, key) for kind, key in KINDS if any(r.get(key) for r in rows if r["method"] != "plain")]
    titles = {"load": "first load, imports done", "cold": "cold: imports + key + first load",
              "warm": "warm: second load, same process"}  # fmt: skip
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4), squeeze=False)
    for ax, (kind, key) in zip(axes[0], kinds, strict=True):
        for method in methods:
            got = sorted((r["size_mb"], r[key]) for r in rows if r["method"] == method and r.get(key))
            if got:
                ax.plot([g[0] for g in got], [g[1] for g in got], marker="o", label=method)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")  # the AES-CBC approach and cold small loads run to 10-30x: a linear axis flattens the rest
        sizes = sorted({r["size_mb"] for r in rows})
        ax.set_xticks(sizes, [f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes], rotation=45)
        ax.minorticks_off()
        ax.set_title(titles[kind], fontsize=10)
        ax.set_ylabel("load time / plaintext load (median of paired runs)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
