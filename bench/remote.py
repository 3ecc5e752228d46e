"""Loading over loopback from an HTTP range server and an S3-compatible server, same run, interleaved.

Servers (real processes): ``tests/remote_servers.py`` (aiohttp; honest answers use aiohttp's own
FileResponse with Range and sendfile; ``--rate`` shapes it to a bandwidth) and, for S3, ``moto_server`` or
npm's s3rver (``--s3rver PATH``). Each load runs in a fresh child process, timed inside it from the first
request to every tensor materialised (the identity or key is ready before), and must return every tensor of
the file. Methods:

- ``plain``: plaintext safetensors fetched whole (one ``http.client`` GET read in one call, the fastest
  single-stream fetch Python has; boto3 ``get_object``) and loaded (``safetensors.torch.load``: the tensors
  are copies, materialised). Before this stop it was an httpx GET, which reads 64 KiB at a time: a weaker
  baseline;
- ``modelseal``: ``modelseal.torch.load_file(URL)``: sealed, streamed by ranges, decrypted in place;
- ``tensorizer``: tensorizer 2.12.1's encrypted file streamed from the same server (its curl stream; for
  ``s3://``, its own S3 support: ``open_stream`` with the same endpoint and keys presigns a URL for that stream);
- ``runai``: runai-model-streamer 0.17.1, plaintext safetensors, S3 only (it has no HTTP backend).

Ratios are each load's time over the plain load of the same round and server; medians over rounds.
``--throttle MBIT`` adds a shaped-HTTP run: sealed load time against the plain transfer alone.

``--uploads`` adds sealing *to* S3 (issue 18, item 2), against the same S3 server, interleaved rounds,
each write in a fresh process timed from the first byte read to the object completed:

- ``upload-plain``: the plaintext safetensors file uploaded by boto3's multipart ``upload_file``
  (``TransferConfig``: the same part size and parts in flight as the sealed upload);
- ``upload-sealed``: ``modelseal.seal(plain file, "s3://...")``: segments encrypted on every core, parts
  uploaded as they fill (``MODELSEAL_REMOTE_PART_SIZE``, ``MODELSEAL_REMOTE_CONCURRENCY``).

    python bench/remote.py [--sizes 1024] [--rounds 3] [--throttle 1000] [--throttle-size 256] [--json]
    python bench/remote.py ... --json --plot docs/remote.png > run.json; python bench/remote.py --rows run.json
    python bench/remote.py --uploads --servers s3 --skip plain,modelseal,tensorizer,runai --sizes 1024
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
CHILD = r"""
import json, os, sys, time
import torch, safetensors.torch
method, url, secret = sys.argv[1:4]
if method == "modelseal":
    import modelseal.torch
    from modelseal.recipients.registry import load_identity
    secret = load_identity(secret)
    from modelseal.load.remote import s3 as _s3
    if url.startswith("s3://"): _s3.client()  # boto3's client is made before timing, as the others' sessions
elif method == "plain":
    import boto3, urllib.request
    client = boto3.client("s3") if url.startswith("s3://") else None
elif method == "tensorizer":
    from tensorizer import TensorDeserializer
    from tensorizer.serialization import DecryptionParams
    from tensorizer.stream_io import open_stream
    dec = DecryptionParams.from_key(bytes.fromhex(secret))
elif method == "transfer":
    import urllib.request
elif method == "runai":
    from runai_model_streamer import SafetensorsStreamer
elif method == "upload-plain":
    import boto3
    from boto3.s3.transfer import TransferConfig
    client = boto3.client("s3")
    part, inflight = int(os.environ["BENCH_PART"]), int(os.environ["MODELSEAL_REMOTE_CONCURRENCY"])
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=inflight)
elif method == "upload-sealed":
    import modelseal
    from modelseal.recipients import parse_recipient
    from modelseal.load.remote import s3 as _s3
    _s3.client()
    recipient = parse_recipient(secret)
import gc
gc.collect()
t0, c0 = time.perf_counter(), time.process_time()
if method == "plain" or method == "transfer":
    if url.startswith("s3://"):
        b, _, k = url[5:].partition("/")
        data = client.get_object(Bucket=b, Key=k)["Body"].read()
    else:
        with urllib.request.urlopen(url, timeout=600) as r:  # Content-Length known: one read of it all
            data = r.read()
    sd = safetensors.torch.load(data) if method == "plain" else {"n": len(data)}
elif method == "modelseal":
    sd = modelseal.torch.load_file(url, identity=secret)
elif method == "tensorizer":
    kw = {}
    if url.startswith("s3://"):
        kw = dict(s3_endpoint=os.environ["AWS_ENDPOINT_URL"].split("//")[1], force_http=True,
                  s3_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                  s3_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    with open_stream(url, **kw) as stream:
        sd = dict(TensorDeserializer(stream, device="cpu", encryption=dec))
elif method == "upload-plain":
    b, _, k = url[5:].partition("/")
    client.upload_file(os.environ["BENCH_SRC"], b, k, Config=config)
    sd = {}
elif method == "upload-sealed":
    modelseal.seal(os.environ["BENCH_SRC"], url, [recipient], force=True)
    sd = {}
else:
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(url)
        sd = {name: t.clone() for name, t in streamer.get_tensors()}
t, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": t, "cpu": cpu, "tensors": len(sd)}))
"""


def make_files(root: Path, size_mb: int, key_path: Path, recipient: str, tensorizer: bool = True) -> str:
    """plain, sealed and tensorizer-encrypted files of ``size_mb`` MiB (fp16 tensors of 16 MiB); the key hex
    (no tensorizer file, and no key, when ``tensorizer`` is left out)."""
    import torch
    from safetensors.torch import save_file

    import modelseal

    n = max(1, size_mb // 16)
    g = torch.Generator().manual_seed(0)
    sd = {f"layer.{i}.weight": torch.randn(4096, 2048, generator=g).half() for i in range(n)}
    save_file(sd, str(root / f"plain-{size_mb}.safetensors"))
    modelseal.seal(root / f"plain-{size_mb}.safetensors", root / f"sealed-{size_mb}.safetensors", [recipient])
    if not tensorizer:
        return ""
    from tensorizer import TensorSerializer
    from tensorizer.serialization import EncryptionParams

    enc = EncryptionParams.random()
    ser = TensorSerializer(str(root / f"tensorizer-{size_mb}.tensors"), encryption=enc)
    ser.write_state_dict(sd)
    ser.close()
    return bytes(enc.key).hex()


def file_for(method: str, size: int) -> str:
    """The file each method loads: its own format, or the plaintext safetensors."""
    return {"tensorizer": f"tensorizer-{size}.tensors", "modelseal": f"sealed-{size}.safetensors"}.get(
        method, f"plain-{size}.safetensors"
    )


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"a server exited at start ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"no server on port {port}")


def free_port() -> int:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from remote_servers import free_port as fp

    return int(fp())


def start_http(root: Path, rate: float | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, str(HERE.parent / "tests" / "remote_servers.py"), "http", str(root), str(port)]
    proc = subprocess.Popen(cmd + (["--rate", str(rate)] if rate else []), stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/"


def start_s3(root: Path, files: list[str], s3rver: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """moto's server, or s3rver (npm; it checks signatures against its fixed S3RVER key pair and keeps
    objects as files, serving a range by reading only that range) when its executable is given."""
    import boto3

    port = free_port()
    if s3rver:
        data = root / "s3rver-data"
        data.mkdir(exist_ok=True)
        cmd = [s3rver, "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "-s"]
        key = "S3RVER"
    else:
        cmd, key = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], "bench"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=key,
                      AWS_DEFAULT_REGION="us-east-1", RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
                      AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for name in files:
        client.upload_file(str(root / name), "bench", name)
    return proc, "s3://bench/"


def run_child(method: str, url: str, secret: str, env: dict[str, str] | None = None, tensors: int = -1) -> float:
    return child_times(method, url, secret, env, tensors)[0]


def child_times(method: str, url: str, secret: str, env: dict[str, str] | None = None,
                tensors: int = -1) -> tuple[float, float]:  # fmt: skip
    """(wall seconds, CPU seconds of all the child's threads) of one timed load or upload; a load must return
    ``tensors`` tensors when that is given."""
    proc = subprocess.run([sys.executable, "-c", CHILD, method, url, secret], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {url}: {proc.stderr.strip().splitlines()[-1:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if tensors >= 0 and out["tensors"] != tensors:
        raise RuntimeError(f"{method} {url}: {out['tensors']} tensors, not {tensors}")
    return float(out["seconds"]), float(out["cpu"])


def process_cpu(pid: int) -> float:
    """CPU seconds a process (a server) has used so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="http,s3")
    ap.add_argument("--skip", default="", help="methods to leave out, comma-separated")
    ap.add_argument("--s3-part-size", default="256M", help="MODELSEAL_REMOTE_PART_SIZE for S3 (docs/benchmarks.md)")
    ap.add_argument("--s3-concurrency", default="4", help="MODELSEAL_REMOTE_CONCURRENCY for S3")
    ap.add_argument("--s3rver", default="", metavar="PATH",
                    help="s3rver's executable (npm install --prefix DIR s3rver@3.7.1): the S3 server instead of moto "
                         "(runai-model-streamer runs against it; moto reads the whole object per range)")  # fmt: skip
    ap.add_argument("--throttle", type=float, default=0, help="also a run shaped to this many Mbit/s")
    ap.add_argument("--throttle-size", type=int, default=256)
    ap.add_argument("--uploads", action="store_true", help="also seal to S3 against a plain multipart upload")
    ap.add_argument("--upload-part-size", default="16M", help="part size of both uploads")
    ap.add_argument("--upload-concurrency", default="4", help="parts in flight in both uploads")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path, help="write a PNG of each method's load time over plaintext")
    ap.add_argument("--rows", type=Path, help="measure nothing: print (and plot) an earlier --json run")
    args = ap.parse_args()
    if args.rows:
        rows = json.loads(args.rows.read_text())["rows"]
        report(rows, args.plot)
        return
    if args.uploads and "s3" not in args.servers:
        ap.error("--uploads needs the s3 server (--servers s3 or http,s3)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers and remove the files on kill
    from modelseal.recipients.hpke import KEMS, HpkeIdentity

    print(f"# {machine()}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ms-remote-") as tmp:
        root = Path(tmp)
        ident = HpkeIdentity.generate(KEMS["x25519"])
        key_path = root / "host.key"
        ident.save(key_path)
        sizes = [int(s) for s in args.sizes.split(",")]
        skip = set(args.skip.split(","))
        secrets = {size: make_files(root, size, key_path, ident.recipient, "tensorizer" not in skip) for size in sizes}
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            if "http" in args.servers:
                servers["http"] = start_http(root)
            if "s3" in args.servers:
                names = [f"{k}-{s}.{ext}" for s in sizes for k, ext in
                         (("plain", "safetensors"), ("sealed", "safetensors"), ("tensorizer", "tensors"))]  # fmt: skip
                servers["s3"] = start_s3(root, [n for n in names if (root / n).exists()], args.s3rver)
            failed: set[tuple[str, str]] = set()
            for size in sizes:
                times: dict[tuple[str, str], list[float]] = {}
                ratios: dict[tuple[str, str], list[float]] = {}
                for rnd in range(args.rounds):
                    for server, (_proc, base) in servers.items():
                        methods = ["plain", "modelseal", "tensorizer"] + (["runai"] if server == "s3" else [])
                        if rnd % 2:
                            methods.reverse()  # interleaved: neither side always runs first
                        got: dict[str, float] = {}
                        for m in (m for m in methods if m not in skip and (server, m) not in failed):
                            url = base + file_for(m, size)
                            secret = {"modelseal": str(key_path), "tensorizer": secrets[size]}.get(m, "")
                            env = None
                            if server == "s3":  # moto copies the whole object for every range it serves
                                env = {"MODELSEAL_REMOTE_PART_SIZE": args.s3_part_size,
                                       "MODELSEAL_REMOTE_CONCURRENCY": args.s3_concurrency}  # fmt: skip
                            try:
                                got[m] = run_child(m, url, secret, env, max(1, size // 16))
                            except RuntimeError as exc:  # reported, and not tried again on this server
                                print(f"# {exc}", file=sys.stderr)
                                failed.add((server, m))
                        for m, t in got.items():
                            times.setdefault((server, m), []).append(t)
                            if "plain" in got:
                                ratios.setdefault((server, m), []).append(t / got["plain"])
                        print(f"# round {rnd + 1} {server} {size} MiB: "
                              + " ".join(f"{m}={t:.2f}s" for m, t in got.items()), file=sys.stderr)  # fmt: skip
                for (server, m), ts in times.items():
                    rs = ratios.get((server, m), [])
                    rows.append({"size_mb": size, "server": server, "method": m, "seconds": statistics.median(ts),
                                 "x_plain": statistics.median(rs) if rs else None, "all": ts})  # fmt: skip
            if args.throttle:
                rows += throttled(root, args, key_path, ident.recipient)
            if args.uploads:
                rows += uploads(root, args, servers["s3"], ident.recipient.describe())
        finally:
            for proc, _base in servers.values():
                proc.terminate()
                proc.wait(10)
    if args.json:
        print(json.dumps({"machine": machine(), "rounds": args.rounds, "rows": rows}, indent=2))
        if args.plot:
            plot(rows, args.plot)
        return
    report(rows, args.plot)


def report(rows: list[dict[str, Any]], path: Path | None) -> None:
    print(f"{'MiB':>5} {'server':10} {'method':11} {'median s':>9} {'x plain':>8}   all")
    for r in rows:
        ratio = f"{r['x_plain']:.2f}" if r["x_plain"] is not None else "-"
        print(f"{r['size_mb']:>5} {r['server']:10} {r['method']:11} {r['seconds']:9.3f} {ratio:>8}   "
              + " ".join(f"{t:.2f}" for t in r["all"]))  # fmt: skip
    if path:
        plot(rows, path)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of each method's load time over the plaintext fetch-and-load (median of per-round ratios), one
    group per server and size, with the issue's 1.1x line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'modelseal[bench]'): no plot", file=sys.stderr)
        return
    loads = [r for r in rows if r["method"] not in ("plain", "transfer") and not r["server"].startswith("s3-up")
             and r["x_plain"] is not None]  # fmt: skip
    groups = list(dict.fromkeys((r["server"], r["size_mb"]) for r in loads))
    methods = list(dict.fromkeys(r["method"] for r in loads))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(3.6 + 1.5 * len(groups), 4))
    for i, method in enumerate(methods):
        xs, ys = [], []
        for g, (server, size) in enumerate(groups):
            found = [r["x_plain"] for r in loads if (r["server"], r["size_mb"], r["method"]) == (server, size, method)]
            if found:
                xs.append(g + (i - (len(methods) - 1) / 2) * width)
                ys.append(found[0])
        ax.bar(xs, ys, width, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(1.1, color="red", linewidth=0.8, linestyle="--", label="target for modelseal (1.1x)")
    labels = [f"{server}\n{size // 1024} GiB" if size >= 1024 else f"{server}\n{size} MiB" for server, size in groups]
    ax.set_xticks(range(len(groups)), labels)
    ax.set_ylabel("load time / plaintext (median of rounds)")
    ax.set_title("Remote loads over loopback (throttled: against the bare transfer)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def uploads(root: Path, args: argparse.Namespace, server: tuple[subprocess.Popen[bytes], str],
            recipient: str) -> list[dict[str, Any]]:  # fmt: skip
    """Sealing to S3 against uploading the plaintext, same server, interleaved, fresh processes. Besides wall
    time, the CPU seconds of the uploading process and of the server: on a shared machine the wall time
    follows the other tenants, the CPU each side spent does not."""
    proc, base = server
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    raw = args.upload_part_size.upper().removesuffix("B").removesuffix("I")
    part = int(raw[:-1]) * scale[raw[-1]] if raw[-1] in scale else int(raw)
    env = {"BENCH_PART": str(part), "MODELSEAL_REMOTE_PART_SIZE": str(part),
           "MODELSEAL_REMOTE_CONCURRENCY": args.upload_concurrency}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for size in [int(x) for x in args.sizes.split(",")]:
        times: dict[str, list[float]] = {"upload-plain": [], "upload-sealed": []}
        cpus: dict[str, list[tuple[float, float]]] = {"upload-plain": [], "upload-sealed": []}
        ratios: list[float] = []
        for rnd in range(args.rounds):
            got = {}
            order = ["upload-plain", "upload-sealed"] if rnd % 2 == 0 else ["upload-sealed", "upload-plain"]
            for m in order:
                url = f"{base}up/{m}-{size}.safetensors"
                before = process_cpu(proc.pid)
                got[m], cpu = child_times(m, url, recipient,
                                          {**env, "BENCH_SRC": str(root / f"plain-{size}.safetensors")})  # fmt: skip
                times[m].append(got[m])
                cpus[m].append((cpu, process_cpu(proc.pid) - before))
            ratios.append(got["upload-sealed"] / got["upload-plain"])
            print(f"# upload round {rnd + 1} {size} MiB: " + " ".join(
                f"{m}={got[m]:.2f}s (cpu client {cpus[m][-1][0]:.2f}s server {cpus[m][-1][1]:.2f}s)" for m in order),
                file=sys.stderr)  # fmt: skip
        client = {m: statistics.median(c for c, _s in v) for m, v in cpus.items()}
        print(f"# upload {size} MiB: client CPU sealed/plain (medians) "
              f"{client['upload-sealed'] / client['upload-plain']:.3f}", file=sys.stderr)  # fmt: skip
        plain, sealed = statistics.median(times["upload-plain"]), statistics.median(times["upload-sealed"])
        rows.append({"size_mb": size, "server": "s3-upload", "method": "upload-plain", "seconds": plain,
                     "x_plain": 1.0, "all": times["upload-plain"]})  # fmt: skip
        rows.append({"size_mb": size, "server": "s3-upload", "method": "upload-sealed", "seconds": sealed,
                     "x_plain": statistics.median(ratios), "ratio_of_medians": sealed / plain,
                     "all": times["upload-sealed"]})  # fmt: skip
        print(f"# upload {size} MiB: sealed/plain ratio of medians {sealed / plain:.3f}, "
              f"median of per-round ratios {statistics.median(ratios):.3f}", file=sys.stderr)  # fmt: skip
    return rows


def throttled(root: Path, args: argparse.Namespace, key_path: Path, recipient: str) -> list[dict[str, Any]]:
    """Sealed streaming through a server shaped to ``--throttle`` Mbit/s, against the bare transfer."""
    size = args.throttle_size
    if not (root / f"sealed-{size}.safetensors").exists():
        make_files(root, size, key_path, recipient)
    rate = args.throttle * 1e6 / 8
    times: dict[str, list[float]] = {"transfer": [], "modelseal": []}
    ratios: list[float] = []
    for rnd in range(args.rounds):
        got = {}
        for m in (["transfer", "modelseal"] if rnd % 2 == 0 else ["modelseal", "transfer"]):
            proc, base = start_http(root, rate)  # a fresh shaper each load: no credit carried over
            try:
                name = f"sealed-{size}.safetensors" if m == "modelseal" else f"plain-{size}.safetensors"
                got[m] = run_child(m, base + name, str(key_path))
            finally:
                proc.terminate()
                proc.wait(10)
        for m, t in got.items():
            times[m].append(t)
        ratios.append(got["modelseal"] / got["transfer"])
        print(f"# throttled round {rnd + 1}: " + " ".join(f"{m}={t:.2f}s" for m, t in got.items()), file=sys.stderr)
    server = f"http@{args.throttle:g}Mbit"
    return [
        {"size_mb": size, "server": server, "method": "transfer", "seconds": statistics.median(times["transfer"]),
         "x_plain": 1.0, "all": times["transfer"]},
        {"size_mb": size, "server": server, "method": "modelseal", "seconds": statistics.median(times["modelseal"]),
         "x_plain": statistics.median(ratios), "all": times["modelseal"]},
    ]  # fmt: skip


if __name__ == "__main__":
    main()
