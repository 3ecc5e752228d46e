"""Sealed models read straight from a real S3-compatible server (moto) and a real HTTP range server.

Each loads bit-exact through every loader (sharded directories too); a flipped byte in the stored object
fails authentication naming the entry; a server that answers with the wrong range, a short body or the
whole object is an error, never wrong weights; transient failures are retried; and an audit hook sees no
file written during a remote load. The servers are real processes' worth of code on loopback sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelseal
import modelseal.numpy
import modelseal.torch
from modelseal.errors import AuthenticationError, FormatError, ModelsealError, UsageError
from modelseal.load.bundles import read_all
from modelseal.load.remote import s3 as s3mod
from modelseal.recipients.hpke import HpkeIdentity

from .remote_servers import Behaviour, range_server, s3_server
from .write_audit import WRITE_AUDIT_HOOK

pytestmark = pytest.mark.slow
SEG = 64 << 10  # small segments: many ranges from a small file
BUCKET = "models"


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((1024, 300)).astype(np.float32),  # 1.2 MB: ~19 segments
        "layer.0.weight": rng.standard_normal((256, 256)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(256).astype(np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "counts": rng.integers(-9, 9, size=(7, 3), dtype=np.int64),
    }


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, host: HpkeIdentity) -> Path:
    """ROOT/w.sealed.safetensors, ROOT/hf/ (two shards, a config: a sealed directory), ROOT/m.dat.sealed."""
    root = tmp_path_factory.mktemp("remote")
    save_file(tensors(), str(root / "w.safetensors"))
    modelseal.seal(root / "w.safetensors", root / "w.sealed.safetensors", [host.recipient], segment_size=SEG)
    src = root / "hfsrc"
    src.mkdir()
    save_file(tensors(1), str(src / "model-00001-of-00002.safetensors"))
    save_file({"head": np.arange(4096, dtype=np.float32)}, str(src / "model-00002-of-00002.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "toy"}))
    modelseal.seal(src, root / "hf", [host.recipient], segment_size=SEG)
    (root / "cfgsrc" / "sub").mkdir(parents=True)
    (root / "cfgsrc" / "a.txt").write_bytes(b"alpha")
    (root / "cfgsrc" / "sub" / "b.json").write_bytes(b"{}")
    modelseal.seal(root / "cfgsrc", root / "cfg", [host.recipient])
    (root / "m.dat").write_bytes(os.urandom(300_000))
    modelseal.seal(root / "m.dat", root / "m.dat.sealed", [host.recipient], segment_size=SEG)
    return root


@pytest.fixture(scope="module")
def s3(sealed: Path) -> Iterator[str]:
    """moto's S3 server holding the sealed files under s3://models/...; boto3 finds it through the
    standard AWS_ENDPOINT_URL, with throwaway credentials in the standard variables."""
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}  # fmt: skip
    with s3_server() as endpoint:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        s3mod._clients.clear()
        client = s3mod.client()
        client.create_bucket(Bucket=BUCKET)
        for p in sorted(sealed.rglob("*")):
            if p.is_file() and ("sealed" in p.name or p.relative_to(sealed).parts[0] in ("hf", "cfg")):
                client.upload_file(str(p), BUCKET, p.relative_to(sealed).as_posix())
        yield endpoint
        s3mod._clients.clear()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def http(sealed: Path) -> Iterator[tuple[str, Behaviour]]:
    with range_server(sealed) as served:
        yield served


@pytest.fixture
def behaviour(http: tuple[str, Behaviour]) -> Iterator[Behaviour]:
    b = http[1]
    b.mode, b.flaky_left, b.flip_at, b.rate = "ok", 0, None, None
    b.requests.clear()
    yield b
    b.mode = "ok"


def base(kind: str, http: tuple[str, Behaviour]) -> str:
    return f"s3://{BUCKET}/" if kind == "s3" else http[0]


def assert_same(got: dict[str, object], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        arr = np.asarray(got[name].numpy() if hasattr(got[name], "numpy") else got[name])  # type: ignore[attr-defined]
        assert arr.dtype == value.dtype and arr.shape == value.shape and arr.tobytes() == value.tobytes(), name


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_every_loader_reads_bit_exact(kind: str, s3: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                                      host: HpkeIdentity, sealed: Path) -> None:  # fmt: skip
    url = base(kind, http)
    want = tensors()
    assert_same(modelseal.torch.load_file(url + "w.sealed.safetensors", identity=host), want)
    assert_same(modelseal.numpy.load_file(url + "w.sealed.safetensors", identity=host), want)
    with modelseal.safe_open(url + "w.sealed.safetensors", "np", identity=host) as f:
        assert f.get_tensor("layer.0.bias").tobytes() == want["layer.0.bias"].tobytes()
    assert bytes(modelseal.read_bytes(url + "m.dat.sealed", identity=host)) == (sealed / "m.dat").read_bytes()


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_sharded_directory(kind: str, s3: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                           host: HpkeIdentity) -> None:  # fmt: skip
    import modelseal.transformers as mt

    url = base(kind, http) + "hf/"
    state = mt.load_state_dict(url, identity=host, framework="np")
    assert_same(state, {**tensors(1), "head": np.arange(4096, dtype=np.float32)})
    assert mt.load_config(url, identity=host) == {"model_type": "toy"}
    files = read_all(base(kind, http) + "cfg/" + ("#a.txt" if kind == "http" else ""), identity=host)
    assert {k: bytes(v) for k, v in files.items()} == {"a.txt": b"alpha", "sub/b.json": b"{}"}
    assert bytes(modelseal.read_bytes(url, "config.json", identity=host)) == b'{"model_type": "toy"}'


def test_get_slice_reads_only_its_ranges(http: tuple[str, Behaviour], behaviour: Behaviour, host: HpkeIdentity) -> None:
    with modelseal.safe_open(http[0] + "w.sealed.safetensors", "np", identity=host) as f:
        behaviour.requests.clear()
        rows = f.get_slice("embed")[10:20]
    assert rows.tobytes() == tensors()["embed"][10:20].tobytes()
    fetched = sum(last - first + 1 for _p, first, last in behaviour.requests)
    assert fetched <= 2 * SEG + 64 * 1024, behaviour.requests  # one or two segments and the tag region


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_a_flipped_byte_fails_naming_the_entry(kind: str, s3: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                                               host: HpkeIdentity, sealed: Path) -> None:  # fmt: skip
    data = bytearray((sealed / "w.sealed.safetensors").read_bytes())
    with modelseal.safe_open(sealed / "w.sealed.safetensors", "np", identity=host) as f:
        entry = f._art.entry("layer.0.weight")
        at = f._art.payload_offset + entry.begin + 1000
    if kind == "s3":
        data[at] ^= 0x01
        s3mod.client().put_object(Bucket=BUCKET, Key="flipped.safetensors", Body=bytes(data))
        url = f"s3://{BUCKET}/flipped.safetensors"
    else:
        behaviour.mode, behaviour.flip_at = "flip", at
        url = http[0] + "w.sealed.safetensors"
    with pytest.raises(AuthenticationError, match=r"entry 'layer\.0\.weight' segment 0 failed authentication"):
        modelseal.numpy.load_file(url, identity=host)


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("status200", FormatError, "whole object"),
        ("wrong_range", FormatError, "wrong range"),
        ("short", FormatError, "Content-Length"),
        ("gzip", FormatError, "encoded"),
        ("lying_range", AuthenticationError, "failed authentication"),  # right header, other bytes
    ],
)
def test_a_hostile_range_server_is_an_error(mode: str, error: type[ModelsealError], message: str,
                                            http: tuple[str, Behaviour], behaviour: Behaviour,
                                            host: HpkeIdentity) -> None:  # fmt: skip
    behaviour.mode = mode
    with pytest.raises(error, match=message) as info:
        modelseal.numpy.load_file(http[0] + "w.sealed.safetensors", identity=host)
    assert "\n" not in str(info.value)


def test_redirects_huge_ranges_and_trickling_servers_are_errors(http: tuple[str, Behaviour], behaviour: Behaviour,
                                                                 host: HpkeIdentity,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Review of the remote sources: a redirect was followed (https -> http, or to an internal address); a
    Content-Range of 5,000 digits was a raw ValueError; a server sending a byte now and then held a load
    for hours (the timeout is between bytes)."""
    url = http[0] + "w.sealed.safetensors"
    behaviour.mode = "redirect"
    with pytest.raises(UsageError, match="does not follow redirects"):
        modelseal.numpy.load_file(url, identity=host)
    behaviour.mode = "huge_range"
    with pytest.raises(FormatError, match="Content-Range"):
        modelseal.numpy.load_file(url, identity=host)
    behaviour.mode = "trickle"  # 256 KiB of header at 6.4 KB/s: 40 s; allowed: 1 s + 1 s at 256 KiB/s
    monkeypatch.setenv("MODELSEAL_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("MODELSEAL_REMOTE_RETRIES", "0")
    with pytest.raises(UsageError, match="slower than"):
        modelseal.numpy.load_file(url, identity=host)


def test_a_forged_member_list_costs_one_member_not_one_per_name(
    tmp_path: Path, sealed: Path, host: HpkeIdentity, other_host: HpkeIdentity
) -> None:
    """The member list of an HTTP directory comes from a header not yet authenticated: every member named
    was opened (a header of up to 100 MiB each, held) before any was unlocked. Now each is unlocked before
    the next is fetched: a member the key does not open stops the load there."""
    import shutil

    from modelseal.transformers import load_state_dict

    root = tmp_path / "site"
    shutil.copytree(sealed / "hf", root / "hf")
    first, later = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"  # listed in this order
    forged = tmp_path / "forged.safetensors"  # a member sealed to another host, as a server could send
    save_file({"x": np.zeros(4, np.float32)}, str(forged))
    modelseal.seal(forged, root / "hf" / first, [other_host.recipient], force=True)
    with range_server(root) as (url, behaviour):
        with pytest.raises(ModelsealError):
            load_state_dict(url + "hf/", identity=host)
        fetched = {path for path, _a, _b in behaviour.requests}
    assert {"hf/config.json", f"hf/{first}"} <= fetched
    assert f"hf/{later}" not in fetched, fetched  # nothing fetched after the member that failed


def test_the_bearer_token_goes_only_to_its_hosts_and_never_to_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.load.remote.config import settings
    from modelseal.load.remote.http import RangeReader

    monkeypatch.setenv("MODELSEAL_HTTP_BEARER_TOKEN", "tok")
    with pytest.raises(UsageError, match="MODELSEAL_HTTP_TOKEN_HOSTS"):  # a token must say where it goes
        settings()
    monkeypatch.setenv("MODELSEAL_HTTP_TOKEN_HOSTS", "models.example.com, cdn.example.com:8443")
    conf = settings()
    sent = {url: "Authorization" in RangeReader(lambda u=url: u, url, conf)._headers for url in (
        "https://models.example.com/m", "https://cdn.example.com:8443/m", "https://evil.example.com/m",
        "http://models.example.com/m", "https://cdn.example.com/m")}  # fmt: skip
    assert sent == {"https://models.example.com/m": True, "https://cdn.example.com:8443/m": True,
                    "https://evil.example.com/m": False, "http://models.example.com/m": False,
                    "https://cdn.example.com/m": False}  # fmt: skip


def test_credentials_in_a_directory_url_stay_out_of_messages(http: tuple[str, Behaviour], behaviour: Behaviour,
                                                             host: HpkeIdentity) -> None:  # fmt: skip
    from modelseal.transformers import load_state_dict

    url = http[0].replace("http://", "http://alice:S3CRETPASS@") + "cfg/"  # a bundle directory: no config.json
    with pytest.raises(ModelsealError) as info:
        load_state_dict(url, identity=host)
    assert "S3CRETPASS" not in str(info.value) and "alice" not in str(info.value)


@pytest.mark.parametrize("mode", ["flaky", "reset"])
def test_transient_failures_are_retried(mode: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                                        host: HpkeIdentity) -> None:  # fmt: skip
    behaviour.mode, behaviour.flaky_left = mode, 3
    assert_same(modelseal.numpy.load_file(http[0] + "w.sealed.safetensors", identity=host), tensors())
    assert behaviour.flaky_left == (0 if mode == "flaky" else -1)  # three 503s, or one answer cut mid-body


def test_retries_are_bounded(http: tuple[str, Behaviour], behaviour: Behaviour, host: HpkeIdentity,
                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MODELSEAL_REMOTE_RETRIES", "2")
    behaviour.mode, behaviour.flaky_left = "flaky", 1000
    with pytest.raises(UsageError, match=r"HTTP 503 \(after 2 retries\)"):
        modelseal.numpy.load_file(http[0] + "w.sealed.safetensors", identity=host)


def test_missing_objects_and_bad_urls_are_one_line(s3: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                                                   host: HpkeIdentity) -> None:  # fmt: skip
    with pytest.raises(UsageError, match="does not exist"):
        modelseal.numpy.load_file(http[0] + "nope.safetensors", identity=host)
    with pytest.raises(UsageError, match="does not exist"):
        modelseal.numpy.load_file(f"s3://{BUCKET}/nope.safetensors", identity=host)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(UsageError, match=r"cannot read http://127\.0\.0\.1:9/x: C"):
        mp.setenv("MODELSEAL_REMOTE_RETRIES", "0")
        modelseal.numpy.load_file("http://127.0.0.1:9/x?token=secret", identity=host)  # the query is never shown


def test_serve_opens_a_pointer_file(tmp_path: Path, http: tuple[str, Behaviour], behaviour: Behaviour,
                                    host: HpkeIdentity) -> None:  # fmt: skip
    from modelseal.serve.source import open_source

    pointer = tmp_path / "model.safetensors.sealed"
    pointer.write_text(f"modelseal-remote: {http[0]}w.sealed.safetensors\n")
    with open_source(pointer, lambda: host) as source:
        assert source.sealed
        art = source.safetensors()
        assert art.path == http[0] + "w.sealed.safetensors"
        assert_same(modelseal.numpy.load_file(http[0] + "w.sealed.safetensors", identity=host), tensors())
    (tmp_path / "d").write_text(f"modelseal-remote: {http[0]}hf/\n")
    with open_source(tmp_path / "d", lambda: host) as source:
        assert sorted(source.artifacts) == ["config.json", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors"]  # fmt: skip


PROBE = textwrap.dedent(
    """
    import os, sys, json
    import numpy, torch
    import modelseal, modelseal.torch, modelseal.transformers
    import httpx, boto3, botocore.session
    from modelseal.load.remote import s3 as _s3
    _s3.client()  # boto3 reads its data files (not writes) when the client is made
    """
) + WRITE_AUDIT_HOOK + textwrap.dedent(
    """
    http, key = sys.argv[1], sys.argv[2]
    n = 0
    for base in (http, "s3://models/"):
        n += len(modelseal.torch.load_file(base + "w.sealed.safetensors", identity=key))
        n += len(modelseal.transformers.load_state_dict(base + "hf/", identity=key))
    print(json.dumps({"writes": writes, "n": n}))
    """
)


def test_a_remote_load_writes_no_file(s3: str, http: tuple[str, Behaviour], behaviour: Behaviour,
                                      host_key: Path) -> None:  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", PROBE, http[0], str(host_key)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n"] == 2 * (5 + 6)
    assert report["writes"] == [], report["writes"]


def test_inspect_and_verify_take_urls_and_open_refuses_them(http: tuple[str, Behaviour], behaviour: Behaviour,
                                                            host_key: Path) -> None:  # fmt: skip
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelseal", *args], capture_output=True, text=True, timeout=120)

    url = http[0] + "w.sealed.safetensors"
    inspected = cli("inspect", url, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert {t["name"] for t in json.loads(inspected.stdout)["tensors"]} == set(tensors())
    members = cli("inspect", http[0] + "hf/", "--json")  # a directory URL: every member, from the seed's list
    assert members.returncode == 0, members.stderr
    assert len(json.loads(members.stdout)) == 3
    verified = cli("verify", url, "-i", str(host_key), "--json")
    assert verified.returncode == 0, verified.stderr
    refused = cli("open", url, "-i", str(host_key), "-o", str(host_key.parent / "plain.safetensors"))
    assert refused.returncode == 1 and "not a URL" in refused.stderr and "Traceback" not in refused.stderr


def test_a_pointer_file_names_only_remote_urls(tmp_path: Path) -> None:
    """A pointer in a model repository (a file any repository writer controls) may name s3://, https://
    and http:// only; a long file beginning like one is a model file, never read whole as a pointer."""
    from modelseal.serve.source import MAX_POINTER, remote_target

    pointer = tmp_path / "model.onnx.sealed"
    for target in ("file:///etc/passwd", "/etc/passwd", "ftp://host/x", ""):
        pointer.write_text(f"modelseal-remote: {target}\n")
        with pytest.raises(UsageError, match="must name an s3://, https:// or http:// URL"):
            remote_target(pointer)
    pointer.write_bytes(b"modelseal-remote: https://h/x\n" + b"\0" * MAX_POINTER)
    assert remote_target(pointer) is None
