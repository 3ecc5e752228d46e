"""modelseal.ray: a sealed model on Ray Serve replicas, each getting its key from the node's agent.

The fast tests check what the driver refuses to hand Ray (key text as the identity or in a runtime_env, a
URL, a too-short key check) and answer V2 requests through the replica's endpoint without Ray. The slow
test starts a local Ray cluster (2 CPUs, a session directory of its own, token authentication with a token
in the environment, not in ~/.ray), a real key service and agent, and a `modelseal serve` beside it: one
replica, then two (the new one's key comes from the agent: its process is in the agent's log), answer
tritonclient and raw HTTP exactly as the plaintext model; bad requests get `modelseal serve`'s statuses
and messages; Ray's object store holds no object the size of the weights and spilled nothing, and no file
under Ray's session directory holds weight bytes; revoking the grant makes both replicas refuse within
one key-check interval.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
from modelseal.errors import UsageError
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.serve.errors import ServeError
from modelseal.serve.infer import decode_rest

from .services import Agent, KeyServer, free_port, wait_for

IN, OUT = 512, 512  # a 1 MiB weight matrix: far larger than any request, response or Ray bookkeeping object
LOOPBACK = "127.0.0.1"


def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((OUT, IN), dtype=np.float32) / np.float32(IN**0.5)


def export(tmp: Path) -> Path:
    """A plain ONNX model, tanh(input @ W.T + b), written with onnx's helpers (no torch: fast to build)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "b"], ["z"], transB=1), helper.make_node("Tanh", ["z"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", OUT])],
        [numpy_helper.from_array(weights(), "W"),
         numpy_helper.from_array(np.linspace(-1, 1, OUT, dtype=np.float32), "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain = tmp / "plain" / "model.onnx"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(model.SerializeToString())
    onnx.checker.check_model(model)
    return plain


def body(batch: np.ndarray, **extra: Any) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(batch.shape), "data": batch.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


# --- the driver: what never goes to Ray ---------------------------------------------------------------


def test_key_material_never_becomes_a_deployment_argument(tmp_path: Path, host: HpkeIdentity, host_key: Path) -> None:
    from modelseal.ray import deployment, replica_args

    key_text = host_key.read_text().strip()
    for identity in (key_text, f"{key_text}\n", "agent:/run/a.sock\n"):
        with pytest.raises(UsageError, match=r"holds a key .*Ray keeps"):
            replica_args("m.onnx.sealed", name="m", identity=identity)
    with pytest.raises(UsageError, match="runtime_env variable holds a key"):
        deployment("m.onnx.sealed", name="m", identity="env:MODELSEAL_IDENTITY",
                   ray_actor_options={"runtime_env": {"env_vars": {"MODELSEAL_IDENTITY": key_text}}})  # fmt: skip
    args = replica_args("m.onnx.sealed", name="m", identity=str(host_key), inputs=["input:FP32:3"])
    assert args["sealed"] == os.path.abspath("m.onnx.sealed") and args["identity"] == str(host_key)
    assert all(isinstance(v, str | int | float | type(None)) or all(isinstance(s, str) for s in v)
               for v in args.values())  # fmt: skip
    assert key_text not in json.dumps(args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sealed": "s3://bucket/model.onnx.sealed"}, "is a URL; name a pointer file"),
        ({"key_check_s": 0.01}, "key_check_s must be 0 .* or at least 0.5"),
        ({"key_check_s": float("nan")}, "key_check_s must be a number"),
        ({"grace_s": 7200}, "grace_s must be between 0 and 3600"),
        ({"retry_s": 0.2}, "retry_s must be 0 .* or at least 1"),
        ({"name": "a/b"}, "name must be a model name"),
        ({"threads": -1}, "threads must be a whole number"),
        ({"inputs": ["input:FP99:3"]}, "a tensor is NAME:DATATYPE:DIMS"),
        ({"trusted_signers": [3]}, "trusted_signers must be a list"),
    ],
)
def test_bad_arguments_refused_in_the_driver(kwargs: dict[str, Any], message: str) -> None:
    from modelseal.ray import replica_args

    args: dict[str, Any] = {"sealed": "m.onnx.sealed", "name": "m", **kwargs}
    with pytest.raises(UsageError, match=message):
        replica_args(args.pop("sealed"), **args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"sealed": "m.onnx.sealed", "name": "m", "identiy": "agent:/a.sock"}, r"unknown argument\(s\) \['identiy'\]"),
        ({"name": "m"}, "needs 'sealed'"),
        ({"sealed": "m.onnx.sealed", "name": "m", "key_check_s": "soon"}, "key_check_s must be a number"),
        ({"sealed": "m.onnx.sealed", "name": "m", "key_check_s": "0.1"}, "at least 0.5"),
        ({"sealed": "m.onnx.sealed", "name": "m", "inputs": "input:FP32:3 mask:INT65:3"}, "NAME:DATATYPE:DIMS"),
    ],
)
def test_config_file_arguments_checked(args: dict[str, str], message: str) -> None:
    """``build_app``: a Serve config file's (or ``serve run``'s) arguments, text converted, typos refused."""
    from modelseal.ray import build_app

    with pytest.raises(UsageError, match=message):
        build_app(args)


def test_the_docs_config_file_example_is_accepted() -> None:
    """docs/ray.md's Serve config: the builder's arguments pass its checks, the deployment is named as
    the model (Serve applies the deployments section by name)."""
    yaml = pytest.importorskip("yaml")
    from modelseal.ray import build_app, replica_args

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ray.md").read_text()
    (app,) = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))["applications"]  # type: ignore[union-attr]
    assert app["import_path"] == "modelseal.ray:build_app" and build_app.__name__ == "build_app"
    args = dict(app["args"])
    assert replica_args(args.pop("sealed"), **args)["name"] == app["deployments"][0]["name"] == app["name"]


def test_endpoint_answers_v2_without_ray(tmp_path: Path, host: HpkeIdentity, host_key: Path) -> None:
    """The replica's routes on a model loaded with a key file: outputs as the plain model's, serve's
    decoder's messages for bad bodies, 404/405 for other routes and methods, 503 once the key is refused."""
    import asyncio

    import onnxruntime as ort

    from modelseal.ray import Endpoint, load_model, replica_args

    plain = export(tmp_path)
    sealed = tmp_path / "sealed" / "model.onnx.sealed"
    sealed.parent.mkdir()
    modelseal.seal(plain, sealed, [host.recipient], as_bundle=True)
    model = load_model(replica_args(sealed, name="tiny", identity=str(host_key), key_check_s=0))
    endpoint = Endpoint(model, "r1")

    def answer(method: str, path: str, data: bytes = b"") -> tuple[int, Any]:
        got = asyncio.run(endpoint.answer(method, path, data, None))
        assert got.headers["Modelseal-Replica"] == "r1"
        return got.status, json.loads(got.body)

    try:
        batch = np.random.default_rng(0).standard_normal((2, IN), dtype=np.float32)
        expected = ort.InferenceSession(str(plain)).run(["output"], {"input": batch})[0]
        status, out = answer("POST", "/v2/models/tiny/infer", body(batch))
        assert status == 200 and out["model_name"] == "tiny" and out["model_version"] == "1"
        np.testing.assert_array_equal(np.array(out["outputs"][0]["data"], np.float32).reshape(2, OUT), expected)
        assert answer("POST", "/v2/models/tiny/versions/1/infer", body(batch))[0] == 200
        with pytest.raises(ServeError) as decoder:
            decode_rest(b'{"inputs": [}', None)
        assert answer("POST", "/v2/models/tiny/infer", b'{"inputs": [}') == (400, {"error": str(decoder.value)})
        assert answer("POST", "/v2/models/other/infer", body(batch)) == (404, {"error": "unknown model 'other'"})
        assert answer("GET", "/v2/models/tiny/infer")[0] == 405
        assert answer("GET", "/nowhere") == (404, {"error": "GET /nowhere: no such route"})
        assert answer("GET", "/v2/models/tiny")[1]["inputs"] == [{"name": "input", "datatype": "FP32",
                                                                  "shape": [-1, IN]}]  # fmt: skip
        assert answer("GET", "/v2/health/ready") == (200, {"ready": True})
        model.refuse("key k_1 of model 'tiny': revoked: licence ended")
        status, out = answer("POST", "/v2/models/tiny/infer", body(batch))
        assert status == 503 and "not ready" in out["error"] and "revoked" in out["error"], out
        assert answer("GET", "/v2/models/tiny/ready")[0] == 400
        assert answer("GET", "/v2/health/ready") == (503, {"ready": False})
        assert model.runtime is None  # closed: its buffers wiped
    finally:
        model.close()


# --- a local Ray cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A local Ray cluster with 2 CPUs (one per replica) and Serve's HTTP proxy on a free loopback port.
    Its session directory is a short temporary one (Ray's unix sockets live there), removed afterwards."""
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'modelseal[ray]')")
    from ray import serve
    from ray._raylet import Config

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        # token authentication with the token in the environment (Ray's processes inherit it), never written
        # to ~/.ray/auth_token; Ray read the mode when imported: Config.initialize reads it again
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        Config.initialize("")
        started = time.monotonic()
        ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 1024 * 1024)  # fmt: skip
        init_s = time.monotonic() - started
        port = free_port()
        serve.start(http_options={"host": LOOPBACK, "port": port})
        yield {"ray": ray, "serve": serve, "url": f"http://{LOOPBACK}:{port}", "temp": Path(temp), "init_s": init_s}
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(temp, ignore_errors=True)


def replicas(handle: Any, count: int) -> dict[str, dict[str, Any]]:
    """Each replica's ``status()`` by replica id, asked through the handle until ``count`` answered."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(found) < count and time.monotonic() < deadline:
        status = handle.status.remote().result(timeout_s=30)
        found[status["replica"]] = status
    assert len(found) == count, found
    return found


def object_store(ray: Any) -> tuple[Any, int]:
    """Ray's node stats (the raylet's GetNodeStats: what ``ray memory`` reads) and the largest object any
    worker holds a reference to."""
    from ray._private.internal_api import node_stats

    node = ray.nodes()[0]
    stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=True)
    sizes = [ref.object_size for worker in stats.core_workers_stats for ref in worker.object_refs]
    return stats.store_stats, max(sizes, default=0)


@pytest.mark.slow
def test_replicas_serve_scale_and_refuse_on_revocation(ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    import httpx
    import onnxruntime as ort

    from modelseal.devstack import Serve
    from modelseal.pki import identity_of_cert_file
    from modelseal.ray import deployment
    from modelseal.release.recipient import KeyserverRecipient
    from modelseal.release.wire import ask

    from .test_keyserver import grant

    tritonclient = pytest.importorskip("tritonclient.http")
    serve, url = ray_cluster["serve"], ray_cluster["url"]
    plain = export(tmp_path)
    w = weights()
    check_s, retry_s = 1.0, 2.0
    with KeyServer(tmp_path / "ks", None, leases={"lease_ttl_s": 4, "renew_after_s": 1}) as keyserver:
        with keyserver.admin() as admin:
            admin.call("POST", "/v1/admin/models", {"model": "tiny"})
        recipient = KeyserverRecipient(keyserver.url, "tiny", token=keyserver.token, ca=keyserver.ca)
        sealed = tmp_path / "repo" / "tiny" / "1" / "model.onnx.sealed"
        sealed.parent.mkdir(parents=True)
        modelseal.seal(plain, sealed, [recipient], as_bundle=True)
        cert = keyserver.host_cert("ray-node")
        g = grant(keyserver, "tiny", identity_of_cert_file(cert[0]).spki)
        agent = Agent(keyserver, cert, tmp_path, name="agent").start()
        spec = f"agent:{agent.socket}"
        # modelseal serve on the same sealed file and agent: the reference for statuses and messages
        reference = Serve(tmp_path / "repo", tmp_path / "serve.log", args=["-i", spec])
        pool = ThreadPoolExecutor(1)
        reference_started = pool.submit(reference.start)
        try:
            # autoscaling from 1 to 2 replicas under load (Serve's own autoscaler, quick settings)
            autoscaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                           "upscale_delay_s": 0, "metrics_interval_s": 0.2, "look_back_period_s": 1}
            app = deployment(sealed, name="tiny", identity=spec, key_check_s=check_s, retry_s=retry_s,
                             autoscaling_config=autoscaling, ray_actor_options={"num_cpus": 1})  # fmt: skip
            started = time.monotonic()
            serve.run(app, name="tiny", route_prefix="/")
            first_s = time.monotonic() - started
            handle = serve.get_app_handle("tiny")
            (one,) = replicas(handle, 1).values()
            assert one["ready"] and not one["dumpable"], one
            agent_log = agent.log.read_text()

            # outputs over Serve's HTTP equal the plaintext model's; concurrent requests until the autoscaler's
            # new replica answers too
            batch = np.random.default_rng(1).standard_normal((3, IN), dtype=np.float32)
            expected = ort.InferenceSession(str(plain)).run(["output"], {"input": batch})[0]
            answered: set[str] = set()

            def hammer(_: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as client:
                    while len(answered) < 2 and time.monotonic() - started < 60:
                        got = client.post("/v2/models/tiny/infer", content=body(batch))
                        assert got.status_code == 200, got.text
                        data = np.array(got.json()["outputs"][0]["data"], np.float32).reshape(3, OUT)
                        np.testing.assert_array_equal(data, expected)
                        answered.add(got.headers["modelseal-replica"])

            started = time.monotonic()
            with ThreadPoolExecutor(8) as clients:
                list(clients.map(hammer, range(8)))
            scale_s = time.monotonic() - started
            both = replicas(handle, 2)
            assert answered == set(both) and one["replica"] in both, (answered, both)  # scaled out, none replaced
            (new,) = (s for r, s in both.items() if r != one["replica"])
            assert new["ready"] and not new["dumpable"] and new["pid"] != one["pid"], new
            # the new replica's process asked the agent for the key itself; nothing carried it through Ray
            handed = re.compile(rf"pid {new['pid']} uid \d+: key \S+ for model tiny handed out")
            assert not handed.search(agent_log)
            wait_for(lambda: bool(handed.search(agent.log.read_text())), 10, "the new replica's key request")

            with httpx.Client(base_url=url, timeout=30) as client:
                triton = tritonclient.InferenceServerClient(url.removeprefix("http://"))
                inp = tritonclient.InferInput("input", list(batch.shape), "FP32")
                inp.set_data_from_numpy(batch)  # binary tensor data both ways
                np.testing.assert_array_equal(triton.infer("tiny", [inp]).as_numpy("output"), expected)

                # bad requests: modelseal serve's statuses and messages
                reference_started.result()
                bad = [
                    ("POST", "/v2/models/tiny/infer", b'{"inputs": [}'),
                    ("POST", "/v2/models/tiny/infer", body(batch[:, :7])),
                    ("POST", "/v2/models/tiny/infer", body(np.ones((9, IN), np.float32))),
                    ("POST", "/v2/models/tiny/infer", body(batch, outputs=[{"name": "nope"}])),
                    ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                                             "shape": [1], "data": [1]}]}).encode()),
                    ("POST", "/v2/models/other/infer", body(batch)),
                    ("POST", "/v2/models/tiny/versions/2/infer", body(batch)),
                    ("GET", "/v2/models/tiny/ready", b""),
                    ("GET", "/v2/models/tiny/infer", b""),
                ]  # fmt: skip
                for method, path, data in bad:
                    ours = client.request(method, path, content=data)
                    theirs = httpx.request(method, f"{reference.base_url}{path}", content=data, timeout=30)
                    assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), (path, data[:80])
                reference.stop()

            # Ray's object store: nothing the size of the weights, nothing spilled; no weight bytes on disk
            store, largest = object_store(ray_cluster["ray"])
            assert largest < w.nbytes // 4, largest
            assert store.spilled_bytes_total == 0 and store.spilled_objects_total == 0
            assert store.object_store_bytes_fallback == 0  # nothing in Ray's disk-backed fallback either
            needles = [w.tobytes()[4096:4160], np.ascontiguousarray(w.T).tobytes()[4096:4160]]
            for path in ray_cluster["temp"].rglob("*"):
                if path.is_file() and not path.is_symlink() and not path.is_socket():
                    data = path.read_bytes()
                    assert not any(n in data for n in needles), path

            # revocation: every replica refuses within one key-check interval of the agent dropping the key
            with keyserver.admin() as admin:
                admin.call("POST", f"/v1/admin/grants/{g['grant_id']}/revoke", {"reason": "licence ended"})
            wait_for(lambda: ask(agent.socket, {"op": "status"})[0]["keys"] == [], 15, "the agent to drop the key")
            dropped = time.monotonic()
            refused: dict[str, float] = {}
            with httpx.Client(base_url=url, timeout=30) as client:
                while set(refused) != set(both) and time.monotonic() - dropped < 15:
                    got = client.post("/v2/models/tiny/infer", content=body(batch))
                    replica = got.headers["modelseal-replica"]
                    if got.status_code == 503:
                        assert "not ready" in got.json()["error"] and "revoked" in got.json()["error"], got.text
                        refused.setdefault(replica, time.monotonic() - dropped)
                    else:
                        assert got.status_code == 200 and replica not in refused, got.text  # refusal is final
                assert set(refused) == set(both), refused
                assert max(refused.values()) <= check_s + 1.0, refused  # one check (plus a request's time)
                statuses = [client.post("/v2/models/tiny/infer", content=body(batch)).status_code for _ in range(20)]
                assert statuses == [503] * 20
            assert all(not s["ready"] and "revoked" in s["reason"] for s in replicas(handle, 2).values())
            # a replica started now cannot get the key: its deployment fails, with the agent's reason
            late = deployment(sealed, name="tiny", identity=spec, max_constructor_retry_count=1,
                              ray_actor_options={"num_cpus": 0})  # fmt: skip
            with pytest.raises(RuntimeError, match="Deploying application late failed"):
                serve.run(late, name="late", route_prefix="/late")
            why = serve.status().applications["late"].deployments["tiny"].message
            assert "KeyReleaseError" in why and "revoked" in why and "licence ended" in why, why

            # a re-grant: every replica loads the model again at its next retry, without a redeploy
            grant(keyserver, "tiny", identity_of_cert_file(cert[0]).spki)
            regranted, back = time.monotonic(), set()
            with httpx.Client(base_url=url, timeout=30) as client:
                while back != set(both) and time.monotonic() - regranted < 15:
                    got = client.post("/v2/models/tiny/infer", content=body(batch))
                    if got.status_code == 503:
                        time.sleep(0.05)
                        continue
                    assert got.status_code == 200, got.text
                    data = np.array(got.json()["outputs"][0]["data"], np.float32).reshape(3, OUT)
                    np.testing.assert_array_equal(data, expected)
                    back.add(got.headers["modelseal-replica"])
            back_s = time.monotonic() - regranted
            assert back == set(both) and back_s <= retry_s + 3, (back, back_s)
            print(f"\nray.init {ray_cluster['init_s']:.1f} s; first replica (serve.run) {first_s:.1f} s, load "
                  f"{one['load_s']:.2f} s; scaled to 2 under load in {scale_s:.1f} s, load {new['load_s']:.2f} s; "
                  f"refused after {sorted(round(v, 2) for v in refused.values())} s; serving again "
                  f"{back_s:.1f} s after a re-grant")  # fmt: skip
        finally:
            pool.shutdown()  # the reference's start has returned (or failed): nothing starts after the stop
            reference.stop()
            for name in serve.status().applications:
                serve.delete(name)
            agent.stop()
