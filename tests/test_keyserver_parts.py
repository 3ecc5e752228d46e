"""Key-service parts on their own: master keys (local file, real OpenBao transit), audit chain, agent socket."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelseal.errors import AuthenticationError, KeyReleaseError
from modelseal.keyserver.masterkey import LocalMasterKey, TransitMasterKey
from modelseal.pki import identity_of_cert_file
from modelseal.release.wire import ask

from .services import Agent, KeyServer, free_port, wait_for
from .test_keyserver import grant, sealed_model


def test_local_master_key_rotation_rewraps_and_retires(tmp_path: Path) -> None:
    mk = LocalMasterKey.create(tmp_path / "master.key")
    assert oct((tmp_path / "master.key").stat().st_mode & 0o777) == "0o600"
    blob, version = mk.wrap(bytes(range(32)), "k_1")
    with pytest.raises(AuthenticationError):
        mk.unwrap(blob, version, "k_2")  # a blob moved to another key's row does not unwrap
    mk.rotate()
    new_blob, new_version = mk.rewrap(blob, version, "k_1")
    mk.retire_old()
    assert (new_version, bytes(mk.unwrap(new_blob, new_version, "k_1"))) == ("local:2", bytes(range(32)))
    assert "V1" not in (tmp_path / "master.key").read_text()


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    bao = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    port, token = free_port(), "test-root-token"
    log = tmp_path_factory.mktemp("bao") / "bao.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}", f"-dev-root-token-id={token}",
             "-dev-no-store-token"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/sys/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, f"OpenBao dev server (log {log})")
        yield url, token
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_transit_master_key_end_to_end(
    openbao: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, token = openbao
    monkeypatch.setenv("BAO_TOKEN", token)
    server = KeyServer(tmp_path / "ks", None, transit={"url": url, "token_env": "BAO_TOKEN", "key": "ms-e2e"}).start()
    try:
        assert not (tmp_path / "ks" / "master.key").exists()  # the master key lives in the vault only
        sealed = sealed_model(server, tmp_path)
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'ks' / 'keyserver.db'}")
        with engine.connect() as conn:
            wrapped, version = conn.exec_driver_sql("SELECT wrapped, wrap_version FROM keys").one()
        assert bytes(wrapped).startswith(b"vault:v1:") and version == "transit:v1"
        cert = server.host_cert("host-a")
        grant(server, "demo", identity_of_cert_file(cert[0]).spki)
        with server.admin() as admin:
            assert admin.call("POST", "/v1/admin/master-key/rotate") == {"version": "transit:v2", "rewrapped": 1}
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT wrap_version FROM keys").scalar() == "transit:v2"
        agent = Agent(server, cert, tmp_path).start()
        try:
            import modelseal.numpy

            assert modelseal.numpy.load_file(sealed, identity=f"agent:{agent.socket}")["counts"].shape == (7, 3)
        finally:
            agent.stop()
        # the old ciphertext no longer decrypts: rotation retired version 1
        with pytest.raises(AuthenticationError, match="transit refused"):
            TransitMasterKey(url, token, "ms-e2e").unwrap(bytes(wrapped), version, "anything")
    finally:
        server.stop()


@pytest.mark.slow
def test_audit_verify_finds_a_modified_entry(tmp_path: Path) -> None:
    server = KeyServer(tmp_path / "ks", None).start()
    try:
        with server.admin() as admin:
            for name in ("a", "b", "c"):
                admin.call("POST", "/v1/admin/models", {"model": name})
    finally:
        server.stop()
    db_url = f"sqlite:///{tmp_path / 'ks' / 'keyserver.db'}"
    cli = [sys.executable, "-m", "modelseal", "keyserver", "audit", "verify", "--db", db_url]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "audit log OK: 3 entries" in ok.stdout
    with sqlite3.connect(tmp_path / "ks" / "keyserver.db") as conn:
        conn.execute("UPDATE audit SET entry = replace(entry, '\"b\"', '\"x\"') WHERE seq = 2")
    broken = subprocess.run(cli, capture_output=True, text=True)
    assert broken.returncode == 1 and "entry 2 was modified" in broken.stdout
    with sqlite3.connect(tmp_path / "ks" / "keyserver.db") as conn:
        conn.execute("DELETE FROM audit WHERE seq = 2")
    cut = subprocess.run(cli, capture_output=True, text=True)
    assert cut.returncode == 1 and "entry 2 is missing" in cut.stdout


@pytest.mark.slow
def test_agent_socket_peer_credentials_and_outage_grace(tmp_path: Path) -> None:
    server = KeyServer(tmp_path / "ks", None, leases={"lease_ttl_s": 2, "renew_after_s": 1}).start()
    sealed = sealed_model(server, tmp_path)
    cert = server.host_cert("host-a")
    grant(server, "demo", identity_of_cert_file(cert[0]).spki, grace_s=6)
    sockets = Path(tempfile.mkdtemp(prefix="modelseal-agent-"))  # pytest's tmp dirs are 0700: others can't enter
    sockets.chmod(0o755)
    agent = Agent(server, cert, sockets, socket_mode="0666", retry_s=0.5).start()
    try:
        assert oct(os.stat(agent.socket).st_mode & 0o777) == "0o666"
        import modelseal.numpy

        modelseal.numpy.load_file(sealed, identity=f"agent:{agent.socket}")
        key_id = ask(agent.socket, {"op": "status"})[0]["keys"][0]["key_id"]
        # another local user: SO_PEERCRED gives its uid, the ACL (default: the agent's own user) refuses it
        probe = (
            "import os\n"
            "from modelseal.release.wire import ask\n"
            "from modelseal.errors import KeyReleaseError\n"
            "os.setgid(65534); os.setuid(65534)  # after the imports: nobody cannot read root's Python\n"
            f"try: ask({agent.socket!r}, {{'op': 'key', 'key_id': {key_id!r}, 'model': 'demo'}})\n"
            "except KeyReleaseError as e: print(e.code, e)\n"
        )
        if os.getuid() == 0:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
            assert out.stdout.startswith("forbidden uid 65534 may not use model demo"), out.stderr

        # outage: the key stays usable until the last lease's expiry + grace (renewed every second, so at least
        # 1 + 6 s from here; roomy because a loaded 2-core CI machine can stall a process for seconds), then
        # it is dropped
        server.stop()
        time.sleep(1.5)
        assert ask(agent.socket, {"op": "key", "key_id": key_id, "model": "demo"})[1]
        wait_for(lambda: not ask(agent.socket, {"op": "status"})[0]["keys"], 20, "the agent to drop the key")
        dropped = ask(agent.socket, {"op": "status"})[0]["dropped"]
        assert [d["code"] for d in dropped.values()] == ["keyserver_unreachable"]
        with pytest.raises(KeyReleaseError) as refused:
            modelseal.numpy.load_file(sealed, identity=f"agent:{agent.socket}")
        assert refused.value.code == "unreachable"
        with pytest.raises(KeyReleaseError, match=r"key_id and model"):
            ask(agent.socket, {"op": "key", "key_id": key_id})
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(sockets)


@pytest.mark.slow
def test_agent_process_is_not_dumpable(tmp_path: Path) -> None:
    code = "from modelseal.memory.locked import harden_process, is_dumpable; harden_process(); print(is_dumpable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
