"""No error repeats a secret: a known key and passphrase are fed through every identity input (``-i``,
``env:VAR``, ``$MODELSEAL_IDENTITY``, key files, ``-r`` by mistake, ``--passphrase-env``, ``serve -i``) in
right and wrong forms, and CLI output, the serve log and HTTP/gRPC bodies are searched for the secret
in raw, hex and base64 forms. Issue 14, item 2 (ac0b701 echoed the whole key: "cannot read identity
file MODELSEAL-IDENTITY-X25519:...")."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import save_file

import modelseal
from modelseal.encoding import b64e
from modelseal.recipients.hpke import KEMS, HpkeIdentity

from .conftest import make_tensors

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

SECRET = bytes(range(7, 39))  # the x25519 identity under test
PASSPHRASE = "correct horse battery staple 4471"  # words: no long run of key characters to spot
TEXT = f"MODELSEAL-IDENTITY-X25519:{b64e(SECRET)}"


def forms() -> list[bytes]:
    """Every way the secret could show up in output."""
    out = [PASSPHRASE.encode(), b64e(SECRET).encode(), base64.b64encode(SECRET), SECRET.hex().encode(), SECRET]
    out.append(SECRET.hex().upper().encode())
    # a prefix long enough to identify the key (a truncated echo such as text[:60] still leaks)
    out += [b64e(SECRET)[:20].encode(), SECRET.hex()[:24].encode()]
    return out


def assert_no_secret(where: str, data: bytes | str) -> None:
    blob = data.encode() if isinstance(data, str) else data
    for form in forms():
        assert form not in blob, f"{where} carries the secret ({form[:12]!r}...): {blob[-2000:]!r}"


def run(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    keep = ("PATH", "HOME", "PYTHONPATH", "ORT_DISABLE_TELEMETRY")  # nothing else: no stray identity variables
    base = {k: os.environ[k] for k in keep if k in os.environ}
    return subprocess.run([sys.executable, "-m", "modelseal", *map(str, args)], capture_output=True,
                          env={**base, **env}, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("echo")
    host = HpkeIdentity(KEMS["x25519"], SECRET)
    plain = tmp / "m.safetensors"
    save_file(make_tensors(), str(plain))
    out = tmp / "m.sealed.safetensors"
    modelseal.seal(plain, out, [host.recipient, modelseal.recipients.passphrase.Passphrase(PASSPHRASE, 10)])
    return out


def test_identity_text_is_accepted_everywhere(sealed: Path) -> None:
    """What users naturally do after reading the README: put the key itself in the variable or -i."""
    for args, env in (
        (["verify", sealed], {"MODELSEAL_IDENTITY": TEXT}),
        (["verify", sealed, "-i", TEXT], {}),
        (["verify", sealed, "-i", "env:K"], {"K": TEXT}),
        (["verify", sealed], {"MODELSEAL_IDENTITY": "passphrase-env:PW", "PW": PASSPHRASE}),
    ):
        proc = run(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert_no_secret(f"{args} {list(env)}", proc.stdout + proc.stderr)


WRONG_INPUTS: list[tuple[list[str], dict[str, str]]] = [
    ([], {"MODELSEAL_IDENTITY": b64e(SECRET)}),  # the bare key, no label
    ([], {"MODELSEAL_IDENTITY": SECRET.hex()}),
    ([], {"MODELSEAL_IDENTITY": TEXT.replace("X25519", "X25519X")}),  # a mistyped label
    ([], {"MODELSEAL_IDENTITY": TEXT + "Q"}),  # a damaged key
    ([], {"MODELSEAL_IDENTITY": PASSPHRASE}),  # the passphrase where a path belongs
    (["-i", b64e(SECRET)], {}),
    (["-i", TEXT.replace("X25519", "X25519X")], {}),
    (["-i", f"{TEXT}\n"[:-2]], {}),
    (["-i", base64.b64encode(SECRET).decode()], {}),  # standard base64 (openssl rand -base64 32): has '/'
    (["-i", ":".join(f"{b:02x}" for b in SECRET)], {}),  # hex with colons
    (["-i", PASSPHRASE], {}),  # the passphrase where a path belongs
    (["-i", "env:K"], {"K": b64e(SECRET)}),
    (["-i", "env:K"], {"K": TEXT.replace("MODELSEAL-", "")}),
    (["--passphrase-env", "PW"], {"PW": PASSPHRASE + "x"}),
    ([], {"MODELSEAL_IDENTITY": "passphrase-env:PW", "PW": PASSPHRASE[:-1]}),
]


@pytest.mark.parametrize(("args", "env"), WRONG_INPUTS, ids=[str(i) for i in range(len(WRONG_INPUTS))])
def test_wrong_identity_inputs_never_echo(sealed: Path, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    for command in (["verify", sealed], ["open", sealed, "-o", tmp_path / "out.safetensors"]):
        proc = run(*command, *args, env=env)
        assert proc.returncode == 1, (command, args, proc.stderr)
        assert b"Traceback" not in proc.stderr
        assert proc.stderr.strip(), "a refusal must say why"
        assert_no_secret(f"{command} {args} {list(env)}", proc.stdout + proc.stderr)
    assert not (tmp_path / "out.safetensors").exists()


def test_key_files_with_bad_contents_never_echo(sealed: Path, tmp_path: Path) -> None:
    for name, contents in (
        ("label.key", TEXT.replace("IDENTITY", "IDENTIY")),
        ("short.key", TEXT[:-3]),
        ("two.key", f"# comment\n{TEXT}x\n"),
        ("binary.key", SECRET[:31] + b"\xff"),
    ):
        path = tmp_path / name
        path.write_bytes(contents.encode() if isinstance(contents, str) else contents)
        proc = run("verify", sealed, "-i", path, env={})
        assert proc.returncode == 1 and proc.stderr.strip()
        assert_no_secret(name, proc.stdout + proc.stderr)


def test_secret_given_as_recipient_never_echoes(tmp_path: Path) -> None:
    plain = tmp_path / "m.safetensors"
    save_file(make_tensors(), str(plain))
    symmetric = f"MODELSEAL-SYMMETRIC-KEY:{b64e(SECRET)}"
    for recipient in (TEXT, b64e(SECRET), SECRET.hex(), base64.b64encode(SECRET).decode(), f"symmetric:{b64e(SECRET)}",
                      f"symmetric:{symmetric}", f"symmetric:{base64.b64encode(SECRET).decode()}"):  # fmt: skip
        proc = run("seal", plain, "-o", tmp_path / "s.safetensors", "-r", recipient, env={})
        assert proc.returncode == 1 and proc.stderr.strip()
        assert_no_secret(f"-r {recipient[:10]}", proc.stdout + proc.stderr)


@pytest.mark.slow
def test_serve_never_echoes_a_bad_identity(sealed: Path, tmp_path: Path) -> None:
    """The server's log, repository index, readiness, inference errors (HTTP and gRPC) stay clean."""
    pytest.importorskip("tritonclient.grpc")
    from .serving import ServeProcess, add_model, export_onnx, small_cnn

    repo = tmp_path / "repo"
    add_model(repo, "cnn", "onnxruntime_onnx", export_onnx(small_cnn(), (3, 16, 16)), (3, 16, 16), 10,
              recipients=[HpkeIdentity(KEMS["x25519"], SECRET).recipient.describe()])  # fmt: skip
    for number, (extra, env) in enumerate((
        ([], {"MODELSEAL_IDENTITY": TEXT.replace("X25519", "X25519X")}),
        (["-i", b64e(SECRET)], {}),
        (["-i", base64.b64encode(SECRET).decode()], {}),
        (["-i", PASSPHRASE], {}),
    )):
        log = tmp_path / f"serve-{number}.log"
        server = ServeProcess(repo, log, env=env, extra=extra)
        try:
            base = f"http://{server.http}"
            bodies = [httpx.get(f"{base}{path}").content for path in
                      ("/v2/models/cnn/ready", "/v2/models/cnn", "/v2/models/cnn/config")]  # fmt: skip
            bodies.append(httpx.post(f"{base}/v2/repository/index", json={}).content)
            request = {"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32",
                                   "data": [0.0] * (3 * 16 * 16)}]}  # fmt: skip
            bodies.append(httpx.post(f"{base}/v2/models/cnn/infer", json=request).content)
            bodies.append(httpx.post(f"{base}/v2/repository/models/cnn/load", json={}).content)
            assert b"UNAVAILABLE" in bodies[3], bodies[3]
            bodies += grpc_answers(server.grpc)
            for body in bodies:
                assert_no_secret("a serve response", body)
        finally:
            server.stop()
        assert_no_secret("the serve log", log.read_bytes())


def grpc_answers(address: str) -> list[bytes]:
    """What a gRPC client sees for an inference, a load and the index (answers or error texts)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    inp = grpcclient.InferInput("input", [1, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    out = []
    for call in (lambda: client.infer("cnn", [inp]), lambda: client.load_model("cnn"),
                 lambda: client.get_model_repository_index(as_json=True)):  # fmt: skip
        try:
            out.append(str(call()).encode())
        except Exception as exc:  # tritonclient raises InferenceServerException with the status text
            out.append(str(exc).encode())
    return out


@pytest.mark.parametrize("where", ["variable", "file"])
def test_admin_token_mistakes_never_echo(tmp_path: Path, where: str) -> None:
    """The attack run after the fix: MODELSEAL_ADMIN_TOKEN_FILE pointed at a private key (or a token with a
    newline inside) put the whole key in `cannot reach the key service ... Illegal header value b'Bearer ...'`."""
    import socket

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = pem.decode().splitlines()[1]
    token_file = tmp_path / "token"
    token_file.write_bytes(pem)
    in_file = {"MODELSEAL_ADMIN_TOKEN_FILE": str(token_file)}
    env = in_file if where == "file" else {"MODELSEAL_ADMIN_TOKEN": f"ab\n{body}"}
    with socket.socket() as listener:  # something listening, so the request is really attempted
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc = run("keyserver", "--url", url, "model", "list", env=env)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
    assert b"admin token" in proc.stderr
    assert body.encode() not in proc.stdout + proc.stderr and body[:20].encode() not in proc.stderr
