"""Attacks on the host agent by local users (issue 14, item 5) and its start-up promises (item 11).

Everything runs for real: a key service and agents in subprocesses, a flood from a process that has
dropped to another uid, raw bytes on the agent's unix socket. The flood tests need root (to become
another uid, so that the agent sees an allowed non-root user next to root) and skip otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelseal.encoding import b64e
from modelseal.errors import KeyReleaseError
from modelseal.pki import identity_of_cert_file
from modelseal.release.wire import MAX_REQUEST, ask

from .services import Agent, KeyServer, wait_for

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="becoming another local uid needs root")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeyServer, tuple[str, str], dict[str, str]]]:
    """One key service; host A is granted models alpha and beta, one key each: ``{model: key_id}``."""
    server = KeyServer(tmp_path_factory.mktemp("ks"), None).start()
    try:
        cert = server.host_cert("host-a")
        spki = identity_of_cert_file(cert[0]).spki
        keys = {}
        with server.admin() as admin:
            for model in ("alpha", "beta"):
                admin.call("POST", "/v1/admin/models", {"model": model})
                key = admin.call("POST", "/v1/admin/keys", {"model": model, "key": b64e(secrets.token_bytes(32))})
                keys[model] = key["key_id"]
                admin.call("POST", "/v1/admin/grants", {"model": model, "identity": spki})
        yield server, cert, keys
    finally:
        server.stop()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory other uids can enter (pytest's tmp directories are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="modelseal-agent-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@contextlib.contextmanager
def soft_fd_limit(limit: int) -> Iterator[None]:
    """Processes started inside inherit a soft RLIMIT_NOFILE of ``limit`` (systemd's default is 1,024)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def start_agent(service: tuple[KeyServer, tuple[str, str], dict[str, str]], directory: Path, **extra: Any) -> Agent:
    """An agent for host A, started as deployed (1,024 descriptors); ``limits=`` becomes its [limits] table."""
    server, cert, _ = service
    tables = {"acl": {'"*"': [NOBODY]}, "limits": extra.pop("limits", {})}
    agent = Agent(server, cert, directory, tables=tables, socket_mode="0666", **extra)
    with soft_fd_limit(1024):
        return agent.start()


def exchange(path: str, data: bytes, timeout: float = 15) -> dict[str, Any]:
    """Send raw ``data`` on a fresh connection and return the agent's one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the agent may refuse (and stop reading) before all of it is sent
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.endswith(b"\n"), f"no answer line, got {answer!r}"
    result: dict[str, Any] = json.loads(answer)
    return result


def line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def releases(server: KeyServer, model: str) -> int:
    with server.admin() as admin:
        grants = admin.call("GET", f"/v1/admin/grants?model={model}")["grants"]
    return sum(int(g["releases"]) for g in grants)


# --- item 5: connection floods -------------------------------------------------------------------

FLOOD = r"""
import json, os, resource, socket, sys, time

path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
hard = max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], count + 256)
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, hard))
os.setgid(65534); os.setuid(65534)  # an unprivileged uid the agent's ACL allows

answers, opened = {}, 0
def connect():
    global opened
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    if s.connect_ex(path) != 0:  # backlog full (EAGAIN): try again next round
        s.close()
        return None
    opened += 1
    try:
        s.send(b'{"op": "key", ')  # a request that never ends: the slowloris
    except OSError:
        pass
    return s

def tend(conns):
    for i, s in enumerate(conns):
        if s is not None:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                try:
                    s.send(b" ")  # one more byte now and then, to look alive
                except OSError:
                    pass
                continue
            except OSError:
                data = b""
            for line in data.splitlines():
                code = json.loads(line).get("code", "?")
                answers[code] = answers.get(code, 0) + 1
            s.close()
        conns[i] = connect()

conns = [connect() for _ in range(count)]
deadline = time.monotonic() + 10
while sum(s is not None for s in conns) < count and time.monotonic() < deadline:
    conns = [s if s is not None else connect() for s in conns]
    time.sleep(0.01)
print("ready", sum(s is not None for s in conns), flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    tend(conns)
    time.sleep(0.25)
print(json.dumps({"opened": opened, "answers": answers}), flush=True)
"""


def root_wait(path: str, request: dict[str, Any]) -> float:
    """Seconds this (root) process waits for its key, then half a second's pause; inf if refused."""
    started = time.monotonic()
    try:
        answer, key = ask(path, request, timeout=5)
        waited = time.monotonic() - started if answer["ok"] and len(key) == 32 else math.inf
    except KeyReleaseError:
        waited = math.inf
    time.sleep(0.5)
    return waited


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize(
    "limits",
    [
        {"request_timeout_s": 1.5},  # the default per-uid cap stops the flood
        {"request_timeout_s": 1.5, "max_connections": 300, "max_connections_per_uid": 5000},  # the reserve does
    ],
    ids=["per-uid-cap", "reserve"],
)
def test_flood_of_slow_connections_leaves_root_served(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path, limits: dict[str, Any]
) -> None:
    """2,000 slow connections from an allowed uid, kept up for seconds: root still gets its key within 1 s,
    each refused or timed-out connection gets an error frame, and the log stays small (counts, not lines)."""
    _, _, keys = service
    agent = start_agent(service, socket_dir, limits=limits)
    request = {"op": "key", "key_id": keys["alpha"], "model": "alpha"}
    flood: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: len(ask(agent.socket, {"op": "status"})[0]["keys"]) == 2, 20, "the prefetch")
        size_before = os.path.getsize(agent.log)
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, agent.socket, "2000", "5"], stdout=subprocess.PIPE, text=True
        )
        assert flood.stdout is not None
        ready = flood.stdout.readline().split()
        waits = [root_wait(agent.socket, request) for _ in range(6)]
        report = json.loads(flood.stdout.readline())
        assert flood.wait(20) == 0
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        agent.stop()
    log = agent.log.read_text()
    grown, slowest = len(log.encode()) - size_before, max(waits)
    print(f"flood {limits}: root's slowest key {slowest * 1000:.0f} ms, flood {report}, log +{grown} bytes")
    assert slowest < 1.0, f"root waited {slowest:.2f} s for its key under the flood ({ready})"
    assert ready == ["ready", "2000"], ready
    # every connection the agent would not keep was told why (busy), and every slow one timed out
    assert report["answers"].get("busy", 0) > 1000 and report["answers"].get("timeout", 0) > 0, report
    assert set(report["answers"]) <= {"busy", "timeout"}, report
    counted = sum(int(n) for n in re.findall(r"suppressed (\d+) lines like: pid %d uid %d: connection refused", log))
    assert counted > 1000 and "Traceback" not in log, log[-3000:]
    assert grown < 64 * 1024, f"the log grew {grown} bytes for {report['opened']} flood connections"


# --- item 5: malformed frames --------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_frames_get_an_error_frame(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path
) -> None:
    """Deep, oversized, idle, non-object, non-UTF-8 and log-forging requests: each gets a clear error line."""
    _, _, keys = service
    agent = start_agent(service, socket_dir, prefetch=False, limits={"request_timeout_s": 1})
    try:
        forged = {"op": "key", "key_id": keys["alpha"], "model": "alpha\n2026 modelseal.agent INFO x"}
        deep = b'{"op": ' + b"[" * 2000 + b"]" * 2000 + b"}\n"
        assert len(deep) < MAX_REQUEST
        cases = {
            "deep": (deep, "too_deep", "the request nests 2001 levels deep, over the limit of 4"),
            "deep_unclosed": (b"[" * 4000 + b"\n", "too_deep", "over the limit of 4"),
            "huge": (b'{"op": "' + b"x" * 200_000 + b'"}\n', "too_large", f"at most {MAX_REQUEST} bytes"),
            "idle": (b'{"op": "key"', "timeout", "no complete request within 1 s"),
            "not_object": (b"[1, 2]\n", "bad_request", "one JSON object"),
            "not_utf8": (b'{"op": "\xff\xfe"}\n', "malformed_json", "the request is not UTF-8"),
            "not_json": (b'{"op": NaN}\n', "malformed_json", "the request is not valid JSON"),
            "forged_log_line": (line(forged), "bad_request", "model is not a model name"),
            "bad_key_id": (line({"op": "key", "key_id": "k/../x", "model": "alpha"}), "bad_request", "not a key"),
            "unknown_op": (b'{"op": "keys"}\n', "bad_request", "expected op"),
        }
        for name, (data, code, message) in cases.items():
            answer = exchange(agent.socket, data)
            assert (answer["ok"], answer["code"]) == (False, code), name
            assert message in answer["message"], (name, answer)
        assert ask(agent.socket, {"op": "key", "key_id": keys["alpha"], "model": "alpha"})[0]["ok"]  # still serving
    finally:
        agent.stop()
    assert "Traceback" not in agent.log.read_text()
    assert "2026 modelseal.agent INFO x" not in agent.log.read_text()


# --- item 5: model/key relation and unknown key ids ------------------------------------------------


def test_key_of_another_model_spends_no_release(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path
) -> None:
    """A loader names model alpha (which its uid may use) with beta's key id: refused before any release."""
    server, _, keys = service
    agent = start_agent(service, socket_dir, prefetch=False)
    before = {model: releases(server, model) for model in keys}
    try:
        with pytest.raises(KeyReleaseError, match=f"key {keys['beta']} belongs to model beta, not alpha") as refused:
            ask(agent.socket, {"op": "key", "key_id": keys["beta"], "model": "alpha"})
        assert refused.value.code == "model_mismatch"
        assert releases(server, "beta") == before["beta"]  # no licence release spent on the wrong key
        assert ask(agent.socket, {"op": "status"})[0]["keys"] == []  # nothing cached, nothing renewing
        assert ask(agent.socket, {"op": "key", "key_id": keys["alpha"], "model": "alpha"})[0]["ok"]
        assert releases(server, "alpha") == before["alpha"] + 1
        with pytest.raises(KeyReleaseError) as held_refusal:  # the held key is checked the same way
            ask(agent.socket, {"op": "key", "key_id": keys["alpha"], "model": "beta"})
        assert held_refusal.value.code == "model_mismatch"
        assert releases(server, "beta") == before["beta"]
    finally:
        agent.stop()


def test_a_grant_made_a_moment_ago_is_checked_before_any_release(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path
) -> None:
    """The attack run after the fix: ask for an unknown id (the agent reads its key list), have the owner
    grant a new model, then at once ask for the new key under another model. The agent used to fetch it
    (the list was too fresh to read again), spending a release of a model this uid may not use."""
    server, cert, _ = service
    agent = start_agent(service, socket_dir, prefetch=False)
    try:
        with pytest.raises(KeyReleaseError):
            ask(agent.socket, {"op": "key", "key_id": f"k_{b64e(secrets.token_bytes(12))}", "model": "alpha"})
        with server.admin() as admin:
            model = f"gamma{secrets.randbelow(10**6)}"
            admin.call("POST", "/v1/admin/models", {"model": model})
            key = admin.call("POST", "/v1/admin/keys", {"model": model, "key": b64e(secrets.token_bytes(32))})
            admin.call("POST", "/v1/admin/grants", {"model": model, "identity": identity_of_cert_file(cert[0]).spki})
        with pytest.raises(KeyReleaseError) as refused:
            ask(agent.socket, {"op": "key", "key_id": key["key_id"], "model": "alpha"})
        assert refused.value.code == "model_mismatch"
        assert releases(server, model) == 0
    finally:
        agent.stop()


@pytest.mark.slow
def test_unknown_key_ids_do_not_grow_the_agent(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path
) -> None:
    """150 made-up key ids: each refused with the key service's reason, the agent remembers a bounded few."""
    agent = start_agent(service, socket_dir, prefetch=False)
    try:
        for _ in range(150):
            with pytest.raises(KeyReleaseError) as refused:
                ask(agent.socket, {"op": "key", "key_id": f"k_{b64e(secrets.token_bytes(12))}", "model": "alpha"})
            assert refused.value.code == "unknown_key"
        dropped = ask(agent.socket, {"op": "status"})[0]["dropped"]
        assert 0 < len(dropped) <= 64
    finally:
        agent.stop()


# --- item 11: start-up errors and warnings ------------------------------------------------------------


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    cli = [sys.executable, "-m", "modelseal", "agent", "run", "--config", str(config)]
    return subprocess.run(cli, capture_output=True, text=True, timeout=30)


def edit_config(agent: Agent, drop: str = "", add: str = "", **replace: str) -> Path:
    """``agent``'s config with lines starting with ``drop`` removed, ``add`` appended, values replaced."""
    lines = [line for line in agent.config.read_text().splitlines() if not (drop and line.startswith(drop))]
    for key, value in replace.items():
        lines = [f'{key} = "{value}"' if line.startswith(f"{key} =") else line for line in lines]
    agent.config.write_text("\n".join([*lines, add]) + "\n")
    return agent.config


def test_missing_socket_directory_is_one_line(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], tmp_path: Path
) -> None:
    server, cert, _ = service
    missing = tmp_path / "no-such-dir"
    config = edit_config(Agent(server, cert, tmp_path), socket=str(missing / "agent.sock"))
    out = run_agent(config)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"modelseal: error: the agent socket directory {missing} does not exist: create it (systemd: "
        "RuntimeDirectory=) or change `socket` in the agent config"
    ]


def test_unpinned_lease_key_warns_and_names_the_command(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], tmp_path: Path
) -> None:
    server, cert, _ = service
    agent = Agent(server, cert, tmp_path)
    config = edit_config(agent, drop="lease_public_key", socket=str(tmp_path / "gone" / "a.sock"))
    out = run_agent(config)  # fails on the missing directory, after the warning
    assert out.returncode == 1
    assert f"lease_public_key is not pinned in {config}" in out.stderr
    assert "`modelseal keyserver lease-key`" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("add", "named"),
    [
        ("lease_publickey = 'ed25519:x'", "unknown key 'lease_publickey'"),
        ("[limits]\nmax_conections = 5", "unknown key 'max_conections' in [limits]"),
        ("[tpm]\ntcit = 'device:/dev/tpmrm0'", "unknown key 'tcit' in [tpm]"),
        ("[limits]\nmax_connections = 'many'", "[limits] max_connections must be a number"),
        ("[limits]\nreserved_connections = 600", "[limits] reserved_connections must be at least 0 and below"),
        ("prefetch = 'no'", "prefetch must be true or false"),
    ],
)
def test_bad_config_keys_are_named(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], tmp_path: Path, add: str, named: str
) -> None:
    server, cert, _ = service
    config = edit_config(Agent(server, cert, tmp_path), add=add)
    out = run_agent(config)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"modelseal: error: {config}: {named}"), out.stderr


# --- item 5: repeated log lines ----------------------------------------------------------------------


def test_repeated_log_lines_are_counted_not_written(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 lines of one kind in one window: ``burst`` are written, then one line with the count."""
    from modelseal.agent.lograte import RepeatFilter

    now = [0.0]
    limiter = RepeatFilter(burst=5, window_s=10, clock=lambda: now[0])
    logger = logging.getLogger("modelseal.agent.test-lograte")
    logger.addFilter(limiter)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            for uid in range(10_000):
                logger.warning("uid %d: connection refused", uid)
            logger.info("another kind of line")  # not held back by the flood
            now[0] = 10.0
            limiter.flush()
            logger.warning("uid %d: connection refused", 1)  # a new window
    finally:
        logger.removeFilter(limiter)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:5] == [f"uid {uid}: connection refused" for uid in range(5)]
    assert messages[5:] == [
        "another kind of line",
        "suppressed 9995 lines like: uid %d: connection refused (at most 5 of a kind per 10 s are logged)",
        "uid 1: connection refused",
    ]
    assert limiter.total_suppressed == 9995


AS_NOBODY = r"""
import json, os, sys
from modelseal.release.wire import ask
os.setgid(65534); os.setuid(65534)  # after the imports: nobody cannot read root's Python
print(json.dumps(ask(sys.argv[1], {"op": "status"})[0]))
"""


@needs_root
@pytest.mark.slow
def test_a_server_user_sees_the_status_of_its_own_models_only(
    service: tuple[KeyServer, tuple[str, str], dict[str, str]], socket_dir: Path
) -> None:
    """``modelseal serve`` under its own uid watches its models' keys (so a revoked model is unloaded); it
    sees no other model's, and a uid the ACL names for nothing sees nothing."""
    server, cert, keys = service

    def held_by(acl: dict[str, list[int]]) -> Agent:
        agent = Agent(server, cert, socket_dir, tables={"acl": acl}, socket_mode="0666", prefetch=False).start()
        for model, key_id in keys.items():  # root fetches both models' keys
            ask(agent.socket, {"op": "key", "key_id": key_id, "model": model})
        return agent

    def seen_by_nobody(agent: Agent) -> dict[str, Any]:
        seen = subprocess.run([sys.executable, "-c", AS_NOBODY, agent.socket], capture_output=True, text=True)
        assert seen.returncode == 0, seen.stderr
        return json.loads(seen.stdout)  # type: ignore[no-any-return]

    agent = held_by({"alpha": [NOBODY]})
    try:
        assert {k["key_id"] for k in ask(agent.socket, {"op": "status"})[0]["keys"]} == set(keys.values())
        status = seen_by_nobody(agent)
        assert status["ok"] and [k["key_id"] for k in status["keys"]] == [keys["alpha"]]
    finally:
        agent.stop()
    agent = held_by({"beta": [0]})
    try:
        status = seen_by_nobody(agent)
        assert status["keys"] == [] and status["dropped"] == {}
    finally:
        agent.stop()
