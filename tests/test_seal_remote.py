"""Sealing straight into S3 (moto's server, real HTTP on loopback): ``seal(..., "s3://bucket/key")`` and
``modelseal seal ... -o s3://...``, files and directories.

What must hold: the object loads back bit-exact through the s3:// loader, signed and with a hidden
header too; nothing is written to disk; memory stays bounded by a few parts; and on any failure (S3
refusing a part in the middle of the upload, Ctrl-C, SIGTERM) no object appears and no multipart upload
is left behind. Failures are real: a proxy in front of moto refuses or slows ``UploadPart`` requests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
from modelseal.errors import UsageError
from modelseal.load.remote import s3 as s3mod
from modelseal.recipients.hpke import HpkeIdentity

from .remote_servers import S3Faults, s3_proxy, s3_server
from .write_audit import WRITE_AUDIT_HOOK

pytestmark = pytest.mark.slow
BUCKET = "sealed"
SEG = 64 << 10
PART = 5 << 20  # S3's smallest part: a 13 MiB file is three parts
AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
       "MODELSEAL_REMOTE_PART_SIZE", "MODELSEAL_REMOTE_CONCURRENCY")  # fmt: skip


def tensors(seed: int = 0, rows: int = 3300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal((rows, 1000)).astype(np.float32),  # 13.2 MB at the default
        "small": rng.standard_normal((17, 3)).astype(np.float16),
        "empty": np.zeros((0, 2), np.float32),
    }


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str, S3Faults]]:
    """(moto's endpoint, the faulty proxy's endpoint, its faults); boto3 goes through the proxy."""
    saved = {k: os.environ.get(k) for k in AWS}
    faults = S3Faults()
    with s3_server() as endpoint, s3_proxy(endpoint, faults) as proxy:
        os.environ.update(AWS_ENDPOINT_URL=proxy, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                          AWS_DEFAULT_REGION="us-east-1", MODELSEAL_REMOTE_PART_SIZE=str(PART),
                          MODELSEAL_REMOTE_CONCURRENCY="2")  # fmt: skip
        s3mod._clients.clear()
        s3mod.client().create_bucket(Bucket=BUCKET)
        yield endpoint, proxy, faults
        s3mod._clients.clear()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def faults(servers: tuple[str, str, S3Faults]) -> Iterator[S3Faults]:
    servers[2].reset()
    yield servers[2]
    servers[2].reset()


def direct(servers: tuple[str, str, S3Faults]) -> Any:
    """A client straight to moto (not through the proxy) to look at what is stored."""
    import boto3

    return boto3.client("s3", endpoint_url=servers[0], region_name="us-east-1")


def leftovers(servers: tuple[str, str, S3Faults], key: str) -> tuple[bool, list[str]]:
    """(whether ``key`` exists, the keys of multipart uploads still open in the bucket)."""
    client = direct(servers)
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=key).get("Contents", [])
    return any(o["Key"] == key or o["Key"].startswith(key.rstrip("/") + "/") for o in listed), uploads


def same(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize(("hidden", "signed"), [(False, False), (True, True)])
def test_a_file_sealed_to_s3_loads_bit_exact(tmp_path: Path, servers: tuple[str, str, S3Faults], faults: S3Faults,
                                             host: HpkeIdentity, signer: modelseal.Signer, hidden: bool,
                                             signed: bool) -> None:  # fmt: skip
    save_file(tensors(), str(tmp_path / "w.safetensors"))
    url = f"s3://{BUCKET}/files/{hidden}-{signed}/w.sealed.safetensors"
    result = modelseal.seal(tmp_path / "w.safetensors", url, [host.recipient], segment_size=SEG, hide_header=hidden,
                            signer=signer if signed else None)  # fmt: skip
    # 13 MiB in 5 MiB parts: three UploadPart requests, and the first once more when the signature is in
    assert faults.parts == 3 + signed
    (row,) = result.outputs
    assert row["output"] == url and row["hidden_header"] is hidden and row["signed"] is signed
    same(modelseal.numpy.load_file(url, identity=host), tensors())
    # the same bytes a local seal would have written, but for the random keys: same layout and size
    modelseal.seal(tmp_path / "w.safetensors", tmp_path / "local", [host.recipient], segment_size=SEG,
                   hide_header=hidden, signer=signer if signed else None)  # fmt: skip
    head = direct(servers).head_object(Bucket=BUCKET, Key=url.split("/", 3)[3])
    assert head["ContentLength"] == row["size"] == (tmp_path / "local").stat().st_size
    if signed:
        with modelseal.open_artifact(url, host, trusted_signers=[signer.public]):
            pass  # opened, unlocked (the hidden index gives the segments) and its signature checked
    assert leftovers(servers, "files/")[1] == []


def test_a_bundle_and_a_small_file_are_one_part(tmp_path: Path, servers: tuple[str, str, S3Faults], faults: S3Faults,
                                                host: HpkeIdentity) -> None:  # fmt: skip
    (tmp_path / "m.onnx").write_bytes(os.urandom(100_000))
    url = f"s3://{BUCKET}/small/m.onnx.sealed"
    modelseal.seal(tmp_path / "m.onnx", url, [host.recipient])
    assert faults.parts == 1
    assert bytes(modelseal.read_bytes(url, identity=host)) == (tmp_path / "m.onnx").read_bytes()


def test_an_existing_object_is_replaced_only_with_force(tmp_path: Path, servers: tuple[str, str, S3Faults],
                                                        faults: S3Faults, host: HpkeIdentity) -> None:  # fmt: skip
    save_file(tensors(rows=10), str(tmp_path / "w.safetensors"))
    url = f"s3://{BUCKET}/force/w.sealed.safetensors"
    modelseal.seal(tmp_path / "w.safetensors", url, [host.recipient])
    with pytest.raises(UsageError, match="already exists"):
        modelseal.seal(tmp_path / "w.safetensors", url, [host.recipient])
    save_file(tensors(seed=5, rows=10), str(tmp_path / "w.safetensors"))
    modelseal.seal(tmp_path / "w.safetensors", url, [host.recipient], force=True)
    same(modelseal.numpy.load_file(url, identity=host), tensors(seed=5, rows=10))
    with pytest.raises(UsageError, match="s3:// URLs only"):
        modelseal.seal(tmp_path / "w.safetensors", "https://example.com/w", [host.recipient])
    with pytest.raises(UsageError, match="names a prefix"):
        modelseal.seal(tmp_path / "w.safetensors", f"s3://{BUCKET}/force/", [host.recipient])


def hf_dir(root: Path, seed: int = 1) -> dict[str, np.ndarray]:
    root.mkdir()
    a, b = tensors(seed, rows=1500), {"head": np.arange(4096, dtype=np.float32)}
    save_file(a, str(root / "model-00001-of-00002.safetensors"))
    save_file(b, str(root / "model-00002-of-00002.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return {**a, **b}


def test_a_directory_sealed_to_a_prefix(tmp_path: Path, servers: tuple[str, str, S3Faults], faults: S3Faults,
                                        host: HpkeIdentity) -> None:  # fmt: skip
    import modelseal.transformers as mt

    want = hf_dir(tmp_path / "hf")
    base = f"s3://{BUCKET}/dirs/hf/"
    result = modelseal.seal(tmp_path / "hf", base.rstrip("/"), [host.recipient], segment_size=SEG)
    assert sorted(o["output"] for o in result.outputs) == [base + n for n in (
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")]  # fmt: skip
    same(mt.load_state_dict(base, identity=host, framework="np"), want)
    assert mt.load_config(base, identity=host) == {"model_type": "toy"}
    with pytest.raises(UsageError, match="already holds 3 objects"):
        modelseal.seal(tmp_path / "hf", base, [host.recipient])
    # a new version with one shard fewer replaces the directory whole: the stale shard is removed
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    modelseal.seal(tmp_path / "hf", base, [host.recipient], force=True)
    same(mt.load_state_dict(base, identity=host, framework="np"), tensors(1, rows=1500))
    assert leftovers(servers, "dirs/")[1] == []


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_part_refused_mid_upload_leaves_nothing(kind: str, tmp_path: Path, servers: tuple[str, str, S3Faults],
                                                  faults: S3Faults, host: HpkeIdentity) -> None:  # fmt: skip
    """S3 refuses the second UploadPart (403, not retried): one line, the multipart upload is aborted, and
    neither the object nor (for a directory) any member exists, although the first member was uploaded."""
    if kind == "file":
        save_file(tensors(), str(tmp_path / "w.safetensors"))
        src, key = tmp_path / "w.safetensors", "fail/w.sealed.safetensors"
    else:
        hf_dir(tmp_path / "hf")
        src, key = tmp_path / "hf", "fail/hf/"
    faults.refuse_after = 1
    with pytest.raises(UsageError, match="access denied") as info:
        modelseal.seal(src, f"s3://{BUCKET}/{key}", [host.recipient], segment_size=SEG)
    assert "\n" not in str(info.value)
    assert faults.refused >= 1 and faults.parts >= 2
    exists, uploads = leftovers(servers, key)
    assert not exists and uploads == []


BIG = 96  # MiB: at 5 MiB parts and 0.4 s per part, several seconds of upload to interrupt


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_upload_aborts_it(sig: int, tmp_path: Path, servers: tuple[str, str, S3Faults], faults: S3Faults,
                                       host: HpkeIdentity) -> None:  # fmt: skip
    save_file({"w": np.ones((BIG << 18,), np.float32)}, str(tmp_path / "big.safetensors"))
    key = f"signal/{sig.name}.sealed.safetensors"
    faults.part_delay = 0.4
    cmd = [sys.executable, "-m", "modelseal", "seal", str(tmp_path / "big.safetensors"), "-o", f"s3://{BUCKET}/{key}",
           "-r", host.recipient.describe(), "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while faults.parts < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert faults.parts >= 2 and proc.poll() is None, "the seal did not start uploading"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode != 0 and "Traceback" not in err, err
    exists, uploads = leftovers(servers, key)
    assert not exists and uploads == [], uploads


PROBE = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import modelseal
    from modelseal.load.remote import s3 as _s3
    _s3.client()
    import botocore.session, boto3
    """
) + WRITE_AUDIT_HOOK + textwrap.dedent(
    """
    src, url, recipient = sys.argv[1:4]
    tracemalloc.start()
    modelseal.seal(src, url, [recipient])
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"writes": writes, "peak": peak}))
    """
)


def test_no_file_is_written_and_memory_is_a_few_parts(tmp_path: Path, servers: tuple[str, str, S3Faults],
                                                      faults: S3Faults, host: HpkeIdentity) -> None:  # fmt: skip
    """A 128 MiB seal in 5 MiB parts, two uploads in flight: no file opened for writing, and the Python heap's
    peak is a few parts, not the file: measured 47 MiB at 64 MiB, 43 MiB at 128 MiB (the first part; two uploading
    and one waiting for an uploader; about two being filled per worker; two recycled; each worker's 4 MiB
    segment of ciphertext)."""
    save_file({"w": np.ones((128 << 18,), np.float32)}, str(tmp_path / "w.safetensors"))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "w.safetensors"),
                           f"s3://{BUCKET}/probe/w.sealed", host.recipient.describe()],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["writes"] == [], report["writes"]
    assert report["peak"] < 64 << 20, report["peak"] / 2**20


def test_the_cli_seals_to_s3(tmp_path: Path, servers: tuple[str, str, S3Faults], faults: S3Faults,
                             host: HpkeIdentity, host_key: Path) -> None:  # fmt: skip
    save_file(tensors(rows=100), str(tmp_path / "w.safetensors"))
    url = f"s3://{BUCKET}/cli/w.sealed.safetensors"
    done = subprocess.run([sys.executable, "-m", "modelseal", "seal", str(tmp_path / "w.safetensors"), "-o", url,
                           "-r", host.recipient.describe(), "--json"], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"][0]["output"] == url
    verified = subprocess.run([sys.executable, "-m", "modelseal", "verify", url, "-i", str(host_key), "--json"],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())  # fmt: skip
    assert verified.returncode == 0, verified.stderr
