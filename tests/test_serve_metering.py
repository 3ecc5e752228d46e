"""Metering and licence limits in `modelseal serve` (issue 21, parts 1 and 2, the serving side).

End to end on loopback: a key service whose grant carries licence terms, an agent keeping a signed usage
log, `modelseal serve` with the agent as identity and mTLS (two client certificates: two client
identities), and real clients (tritonclient HTTP and gRPC, httpx, the TF Serving gRPC client). Counts are
read back from the agent's usage log, verified entry by entry with the chain verifier the key service
uses. The fast tests drive the metering glue (:mod:`modelseal.serve.metering`) with a real
:class:`~modelseal.release.meter.Meter` holding the licences an agent states.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelseal
from modelseal import pki
from modelseal.pki import identity_of_cert_file
from modelseal.release.meter import Licence, Meter
from modelseal.release.recipient import KeyserverRecipient
from modelseal.release.terms import Terms, Usage
from modelseal.release.usage import ChainVerifier
from modelseal.release.wire import ask
from modelseal.serve.errors import ServeError
from modelseal.serve.metering import Metering, MeteringError, rate_client, too_many
from modelseal.serve.metrics import Metrics

from .services import Agent, KeyServer, wait_for
from .serving import ServeProcess, Tls, add_model, infer_grpc, infer_http
from .test_keyserver import grant

FEATURES, CLASSES = 4, 3


def tiny_onnx() -> bytes:
    """input [-1, 4] -> output [-1, 3]: a MatMul, so each row's answer is known."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [FEATURES, CLASSES], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", CLASSES])], [w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()  # type: ignore[no-any-return]


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURES), dtype=np.float32)


class Stack:
    """Key service grant (with ``terms``) -> agent with a usage log -> `modelseal serve` over mTLS, serving
    model ``m``: ``versions`` versions, each sealed on its own (its own key, one grant)."""

    def __init__(self, keyserver: KeyServer, tmp: Path, terms: dict[str, Any] | None = None, *, versions: int = 1,
                 delay_us: int | None = None, sync_s: float = 0.2, serve: bool = True) -> None:  # fmt: skip
        self.keyserver = keyserver
        with keyserver.admin() as admin:
            admin.call("POST", "/v1/admin/models", {"model": "m"})
        recipient = KeyserverRecipient(keyserver.url, "m", token=keyserver.token, ca=keyserver.ca)
        repo = tmp / "repo"
        first = add_model(repo, "m", "onnxruntime_onnx", tiny_onnx(), (FEATURES,), CLASSES, recipients=[recipient],  # type: ignore[list-item]
                          delay_us=delay_us)  # fmt: skip
        for version in range(2, versions + 1):
            directory = repo / "m" / str(version)
            directory.mkdir()
            (directory / "model.onnx").write_bytes(tiny_onnx())
            modelseal.seal(directory / "model.onnx", directory / "model.onnx.sealed", [recipient], as_bundle=True)
            (directory / "model.onnx").unlink()
        if versions > 1:
            config = repo / "m" / "config.pbtxt"
            config.write_text(config.read_text() + "version_policy: { all { } }\n")
        assert first.exists()
        host_cert = keyserver.host_cert("host")
        extra = {"terms": terms} if terms is not None else {}
        self.grant = grant(keyserver, "m", identity_of_cert_file(host_cert[0]).spki, **extra)
        self.usage_log = tmp / "usage.log"
        self.agent = Agent(keyserver, host_cert, tmp, usage_log=str(self.usage_log)).start()
        self.tls = Tls(tmp / "serve-pki")
        self.alice, self.bob = self.tls.client("alice"), self.tls.client("bob")
        self.audit = tmp / "audit.jsonl"
        self.repo, self.tmp, self.sync_s = repo, tmp, sync_s
        if serve:
            self.serve = self.start_serve()

    def start_serve(self) -> ServeProcess:
        return ServeProcess(self.repo, self.tmp / "serve.log", tls=self.tls, extra=[
            "-i", f"agent:{self.agent.socket}", "--usage-sync-s", str(self.sync_s), "--audit-log", str(self.audit),
        ])  # fmt: skip

    def stop(self) -> None:
        try:
            if hasattr(self, "serve"):
                assert self.serve.stop() == 0
        finally:
            self.agent.stop()

    def logged(self) -> tuple[Usage, set[str]]:
        """The grant's usage in the agent's log (every entry verified), and the key ids it was logged under."""
        verifier = ChainVerifier()
        total, keys = Usage(), set()
        for line in self.usage_log.read_bytes().splitlines():
            entry = verifier.add(line)
            if entry.kind == "usage":
                assert entry.body["grant"] == self.grant["grant_id"]
                total = total + Usage.from_json(entry.body["delta"])
                keys.add(entry.body["key_id"])
        return total, keys

    def https(self, cert: tuple[str, str] | None = None) -> Any:
        import httpx

        ctx = pki.client_context(self.tls.ca, *(cert or self.alice))
        return httpx.Client(base_url=self.serve.base_url, verify=ctx, timeout=30)

    def tf_grpc(self, cert: tuple[str, str] | None = None) -> Any:
        from modelseal.serve.tfserving.client import TFServingClient

        cert = cert or self.alice
        return TFServingClient(self.serve.grpc, ca=self.tls.ca, cert=cert[0], key=cert[1])


def v2_body(batch: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}  # fmt: skip


def concurrently(n: int, call: Any) -> list[Any]:
    """``call()`` from ``n`` threads at once: each one's answer, or the exception it raised."""
    answers: list[Any] = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            answers[i] = call()
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def grpc_refusal(call: Any) -> Any:
    """The grpc.RpcError ``call()`` raised."""
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


# --- end to end (real processes) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_counts_match_requests_over_every_api_with_dynamic_batching(renewing_keyserver: KeyServer,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    """What was answered is counted once, requests and rows, whatever the API, batched or not; refused
    requests are not; the counts reach the agent only at shutdown here (a sync interval of a minute, the
    most allowed), so a clean stop is what delivers them."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    stack = Stack(renewing_keyserver, tmp_path, {"metered": True}, delay_us=100_000, sync_s=60)
    try:
        http, grpc = stack.serve.http_client(stack.alice), stack.serve.grpc_client(stack.alice)
        for n in (1, 2, 3):
            assert infer_http(http, "m", rows(n)).shape == (n, CLASSES)
        assert infer_grpc(grpc, "m", rows(4)).shape == (4, CLASSES)
        with stack.https() as client:  # TF Serving's REST API: 2 instances
            assert client.post("/v1/models/m:predict", json={"instances": rows(2).tolist()}).status_code == 200
            bad = client.post("/v2/models/m/infer", json=v2_body(rows(2)[:, :3]))  # a wrong shape: refused, not counted
            assert bad.status_code == 400
        tf = stack.tf_grpc()
        try:  # TF Serving's gRPC API: 3 rows
            assert tf.predict(tf.request("m", {"input": rows(3)}))["output"].shape == (3, CLASSES)
        finally:
            tf.close()
        with pytest.raises(InferenceServerException):
            infer_grpc(grpc, "m", rows(9))  # over max_batch_size 8: refused before it is admitted
        # eight concurrent single-row requests: dynamic batching runs them together, each counts itself
        before = http.get_inference_statistics("m")["model_stats"][0]["execution_count"]
        answers = concurrently(8, lambda: infer_grpc(stack.serve.grpc_client(stack.alice), "m", rows(1)))
        assert all(isinstance(a, np.ndarray) for a in answers)
        executions = http.get_inference_statistics("m")["model_stats"][0]["execution_count"] - before
        assert executions < 8  # at least one execution held several requests
        time.sleep(0.5)
        assert stack.logged()[0] == Usage()  # nothing reported yet: the next sync is a minute away
    finally:
        stack.stop()  # SIGTERM: drain, report, unload
    used, keys = stack.logged()
    assert used == Usage(requests=6 + 8, items=1 + 2 + 3 + 4 + 2 + 3 + 8), used
    assert len(keys) == 1


@pytest.mark.slow
def test_quota_refuses_the_request_past_max_requests_on_every_api_and_version(renewing_keyserver: KeyServer,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """max_requests 5: five answered (over two versions, each sealed to its own key), then the sixth is
    429 / RESOURCE_EXHAUSTED naming the limit on V2 and TF Serving, REST and gRPC alike. Requests that
    fail validation take no quota. The refusals are in the audit log and the metrics."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    stack = Stack(renewing_keyserver, tmp_path, {"max_requests": 5, "period_s": 86400}, versions=2)
    try:
        http, grpc = stack.serve.http_client(stack.alice), stack.serve.grpc_client(stack.bob)
        with stack.https() as client:
            for _ in range(3):  # not valid: not counted
                assert client.post("/v2/models/m/versions/1/infer", json=v2_body(rows(1)[:, :2])).status_code == 400
                assert client.post("/v1/models/m:predict", json={"instances": [[1.0]]}).status_code == 400
            assert client.post("/v2/models/m/versions/1/infer", json=v2_body(rows(1))).status_code == 200  # 1
            assert client.post("/v2/models/m/versions/2/infer", json=v2_body(rows(1))).status_code == 200  # 2
            tf_rest = client.post("/v1/models/m/versions/1:predict", json={"instances": rows(1).tolist()})
            assert tf_rest.status_code == 200  # 3
        infer_grpc(grpc, "m", rows(1))  # 4: version 2 (the newest)
        tf = stack.tf_grpc()
        try:
            tf.predict(tf.request("m", {"input": rows(1)}))  # 5
            refused_tf = grpc_refusal(lambda: tf.predict(tf.request("m", {"input": rows(1)})))
        finally:
            tf.close()
        import grpc as grpclib

        assert refused_tf.code() == grpclib.StatusCode.RESOURCE_EXHAUSTED
        assert "max_requests 5 per day reached" in refused_tf.details()
        assert int(dict(refused_tf.trailing_metadata())["retry-after"]) >= 1
        with pytest.raises(InferenceServerException, match="max_requests 5") as refused_grpc:
            infer_grpc(grpc, "m", rows(1))
        assert "RESOURCE_EXHAUSTED" in str(refused_grpc.value.status())
        with stack.https(stack.bob) as client:
            for path, body in (("/v2/models/m/versions/1/infer", v2_body(rows(1))),
                               ("/v2/models/m/versions/2/infer", v2_body(rows(1))),
                               ("/v1/models/m/versions/2:predict", {"instances": rows(1).tolist()})):  # fmt: skip
                answer = client.post(path, json=body)
                assert answer.status_code == 429, (path, answer.text)
                assert "max_requests 5 per day reached (requests used: 5)" in answer.json()["error"]
                assert "grant " + stack.grant["grant_id"] in answer.json()["error"]
                assert 1 <= int(answer.headers["Retry-After"]) <= 86400
            with pytest.raises(InferenceServerException, match="max_requests 5"):
                infer_http(http, "m", rows(1))
            metrics = client.get("/metrics").text
        assert 'modelseal_licence_refusals_total{kind="quota",model="m"} 6.0' in metrics
        wait_for(lambda: 'modelseal_licence_used{count="requests",model="m"} 5.0' in stack.https().get("/metrics").text,
                 10, "the licence gauges")  # fmt: skip
        assert 'modelseal_licence_limit{count="requests",model="m"} 5.0' in stack.https().get("/metrics").text
        wait_for(lambda: stack.logged()[0].requests == 5, 10, "the counts to reach the agent's log")

        def reported() -> bool:  # the agent's next renewal carries them to the key service
            with stack.keyserver.admin() as admin:
                usage = admin.usage(grant=stack.grant["grant_id"])["usage"]
            return bool(usage) and usage[0]["requests"] == 5 and usage[0]["items"] == 5

        wait_for(reported, 15, "the counts to reach the key service's usage report")
        held = ask(stack.agent.socket, {"op": "status"})[0]["keys"]
        assert len({k["key_id"] for k in held}) == 2  # each version its own key, one grant

        assert stack.serve.stop() == 0  # a restarted server learns the usage from the agent: no fresh quota
        stack.serve = stack.start_serve()
        with stack.https() as client:
            answer = client.post("/v2/models/m/infer", json=v2_body(rows(1)))
            assert answer.status_code == 429 and "(requests used: 5)" in answer.json()["error"]
    finally:
        stack.stop()
    used, keys = stack.logged()
    assert used == Usage(requests=5, items=5) and len(keys) == 1  # one key per grant: versions share the counts
    statuses = [line for line in stack.audit.read_text().splitlines() if '"status":"resource_exhausted"' in line]
    assert len(statuses) == 7


@pytest.mark.slow
def test_max_items_refuses_a_batch_that_would_pass_it(renewing_keyserver: KeyServer, tmp_path: Path) -> None:
    """max_items 20: a batch that would pass it is refused while a smaller one passes; a burst of
    concurrent requests (batched together) cannot all slip under the limit before any is counted."""
    pytest.importorskip("tritonclient.grpc")
    stack = Stack(renewing_keyserver, tmp_path, {"max_items": 20}, delay_us=200_000)
    try:
        with stack.https() as client:
            def post(n: int) -> Any:
                return client.post("/v2/models/m/infer", json=v2_body(rows(n)))

            assert post(8).status_code == 200  # 8
            assert post(9).status_code == 400  # over max_batch_size 8: refused as invalid, not counted
            assert post(8).status_code == 200  # 16
            refused = post(5)
            assert refused.status_code == 429
            assert "max_items 20 per day reached (items used: 16)" in refused.json()["error"]
            assert post(1).status_code == 200  # 17: a smaller batch still passes
        # 8 concurrent one-row requests (batched together) against 3 items left: exactly 3 pass
        results = concurrently(8, lambda: infer_http(stack.serve.http_client(stack.bob), "m", rows(1)))
        assert sum(isinstance(r, np.ndarray) for r in results) == 3, results
        assert all("max_items 20" in str(r) for r in results if not isinstance(r, np.ndarray))
        wait_for(lambda: stack.logged()[0] == Usage(requests=6, items=20), 10, "the counts in the agent's log")
    finally:
        stack.stop()


@pytest.mark.slow
def test_rate_limit_is_per_client(renewing_keyserver: KeyServer, tmp_path: Path) -> None:
    """rate 2: a burst from one client certificate is refused with Retry-After, while another client's
    requests still pass, over HTTP and gRPC; waiting lets the first through again."""
    pytest.importorskip("tritonclient.grpc")
    import grpc as grpclib

    stack = Stack(renewing_keyserver, tmp_path, {"rate": 2})
    try:
        with stack.https(stack.alice) as alice, stack.https(stack.bob) as bob:
            statuses = [alice.post("/v2/models/m/infer", json=v2_body(rows(1))) for _ in range(4)]
            assert [r.status_code for r in statuses[:2]] == [200, 200]
            refused = [r for r in statuses if r.status_code == 429]
            assert refused and "rate limit of 2 requests per second per client" in refused[0].json()["error"]
            assert refused[0].headers["Retry-After"] == "1"
            assert bob.post("/v2/models/m/infer", json=v2_body(rows(1))).status_code == 200
            tf = stack.tf_grpc(stack.alice)
            try:
                error = grpc_refusal(lambda: [tf.predict(tf.request("m", {"input": rows(1)})) for _ in range(3)])
                assert error.code() == grpclib.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in error.details()
            finally:
                tf.close()
            time.sleep(1.1)
            assert alice.post("/v2/models/m/infer", json=v2_body(rows(1))).status_code == 200
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_new_period_resets_the_quota(renewing_keyserver: KeyServer, tmp_path: Path) -> None:
    stack = Stack(renewing_keyserver, tmp_path, {"max_requests": 2, "period_s": 10})
    try:
        with stack.https() as client:
            if time.time() % 10 > 7:  # not across a period boundary
                time.sleep(10 - time.time() % 10 + 0.1)
            assert [client.post("/v2/models/m/infer", json=v2_body(rows(1))).status_code for _ in range(3)] == [
                200, 200, 429]  # fmt: skip
            time.sleep(10 - time.time() % 10 + 0.2)
            assert client.post("/v2/models/m/infer", json=v2_body(rows(1))).status_code == 200
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_model_is_not_served_unmetered_when_the_agent_does_not_answer(renewing_keyserver: KeyServer,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """The key comes from the agent, then the usage report finds no agent (its socket gone between the
    two): the load fails naming metering, the model stays unavailable and retried; once the agent
    answers again the retry serves it."""
    from modelseal.serve.models import ModelManager
    from modelseal.serve.repository import Repository

    stack = Stack(renewing_keyserver, tmp_path, {"max_requests": 100}, serve=False)

    async def scenario() -> None:
        manager = ModelManager(Repository(stack.repo), f"agent:{stack.agent.socket}", Metrics())
        assert manager.metering is not None
        manager.metering.meter.socket = str(tmp_path / "gone.sock")  # the key fetch still uses the agent
        with pytest.raises(ServeError, match=r"usage metering unavailable: the agent at .*gone.sock did not take "
                           r"the usage report: cannot reach the modelseal agent") as refused:  # fmt: skip
            await manager.load("m")
        assert refused.value.status == 503
        state = manager.states["m"]
        assert (state.state, state.retry) == ("UNAVAILABLE", True) and "m" not in manager.models
        manager.metering.meter.socket = stack.agent.socket
        await manager.retry_dropped()
        assert manager.states["m"].state == "READY"
        model = manager.get("m")
        answer = await manager.infer(model, {"input": rows(2)}, [], client="spki:test")
        assert answer["output"].shape == (2, CLASSES)
        assert manager.metering.used(model.keys) == Usage(requests=1, items=2)
        await manager.close()  # reports the count

    try:
        asyncio.run(scenario())
    finally:
        stack.stop()
    assert stack.logged()[0] == Usage(requests=1, items=2)


# --- the metering glue (fast) --------------------------------------------------------------------------


def metering_with(licences: dict[str, Licence]) -> Metering:
    """Metering through a real Meter that holds ``licences`` as an agent states them (no agent behind it:
    a sync fails)."""
    meter = Meter("/nonexistent/agent.sock")
    meter.licences, meter.metering = licences, True  # as an agent with a usage log answers
    return Metering(meter.socket, Metrics(), meter=meter)


def licence(key_id: str, grant_id: str, terms: Terms, used: Usage | None = None) -> Licence:
    return Licence(key_id, "m", grant_id, terms, terms.period_start(time.time()), used or Usage())


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [too_many("x", s).retry_after for s in (0.0, 0.2, 1.0, 2.1)] == [1, 1, 1, 3]
    assert too_many("x", 5).status == 429 and too_many("x", 5).grpc_code == "RESOURCE_EXHAUSTED"


def test_rate_limits_count_the_client_certificate_else_the_peer_address() -> None:
    assert rate_client("spki:abc", "ipv4:10.0.0.1:5555") == "spki:abc"
    assert rate_client("anonymous", "ipv4:10.0.0.1:5555") == "address 10.0.0.1"  # every connection: one client
    assert rate_client("anonymous", "ipv6:[::1]:5555") == "address [::1]"
    assert rate_client("anonymous", "10.0.0.2") == "address 10.0.0.2"  # aiohttp's request.remote
    assert rate_client("anonymous", None) == "anonymous"


def test_a_metered_licence_is_not_served_through_an_agent_without_a_usage_log() -> None:
    """Defence in depth (the key service gives such an agent no metered key): the review found a host
    serving a metered model through a second agent that kept no log."""
    metering = metering_with({"k1": licence("k1", "g1", Terms(metered=True))})
    metering.meter.metering = False
    with pytest.raises(ServeError, match="keeps no usage log") as refused:
        metering.admit("m", {"k1"}, "alice", 1)
    assert refused.value.status == 503


def test_a_grant_keeps_its_charged_key_when_another_key_of_it_appears() -> None:
    """The second review: three requests in flight against a quota of 3, then the agent also stated a
    smaller key id of the same grant; the charge moved to it and three more were admitted."""
    terms = Terms(max_requests=3)
    metering = metering_with({"k_2": licence("k_2", "g1", terms)})
    running = [metering.admit("m", {"k_2"}, "alice", 1) for _ in range(3)]
    metering.meter.licences = {"k_1": licence("k_1", "g1", terms), "k_2": licence("k_2", "g1", terms)}
    with pytest.raises(ServeError, match="max_requests 3"):
        metering.admit("m", {"k_1", "k_2"}, "bob", 1)
    for charge in running:
        assert charge is not None
        metering.done(charge, answered=True)


def test_versions_of_one_grant_share_counts_and_rate_buckets() -> None:
    terms = Terms(max_requests=3, rate=1)
    metering = metering_with({"k_v1": licence("k_v1", "g1", terms), "k_v2": licence("k_v2", "g1", terms)})
    metering.done(metering.admit("m", {"k_v1"}, "alice", 1), answered=True)
    with pytest.raises(ServeError, match="rate limit") as refused:  # the bucket is the grant's, not the key's
        metering.admit("m", {"k_v2"}, "alice", 1)
    assert refused.value.status == 429
    metering.done(metering.admit("m", {"k_v2"}, "bob", 1), answered=True)
    metering.done(metering.admit("m", {"k_v2"}, "carol", 1), answered=True)
    with pytest.raises(ServeError, match="max_requests 3"):
        metering.admit("m", {"k_v1"}, "dave", 1)
    assert metering.used({"k_v2"}) == Usage(requests=3, items=3)


def test_in_flight_requests_are_reserved_and_failed_ones_not_counted() -> None:
    metering = metering_with({"k1": licence("k1", "g1", Terms(max_items=10), used=Usage(requests=1, items=2))})
    first = metering.admit("m", {"k1"}, "alice", 5)
    with pytest.raises(ServeError, match="max_items 10"):  # 2 used + 5 in flight + 4 > 10
        metering.admit("m", {"k1"}, "alice", 4)
    second = metering.admit("m", {"k1"}, "alice", 3)
    assert first is not None and second is not None
    metering.done(first, answered=False)  # its run failed: not counted, its reservation freed
    metering.done(second, answered=True)
    assert metering.used({"k1"}) == Usage(requests=2, items=5)
    metering.done(metering.admit("m", {"k1"}, "alice", 5), answered=True)
    text = metering.metrics.render()[0].decode()
    assert 'modelseal_licence_refusals_total{kind="quota",model="m"} 1.0' in text


def test_unsealed_models_are_not_metered_and_a_dropped_licence_refuses() -> None:
    metering = metering_with({"k1": licence("k1", "g1", Terms(max_requests=0))})
    assert metering.admit("plain", set(), "alice", 1) is None
    with pytest.raises(ServeError, match="no longer holds a licence") as refused:
        metering.admit("m", {"k_gone"}, "alice", 1)
    assert refused.value.status == 503


def test_a_sync_the_agent_does_not_answer_fails_and_keeps_the_counts() -> None:
    metering = metering_with({"k1": licence("k1", "g1", Terms(max_requests=5))})
    metering.done(metering.admit("m", {"k1"}, "alice", 2), answered=True)

    async def twice() -> None:
        for _ in range(2):
            with pytest.raises(MeteringError, match="did not take the usage report: cannot reach the modelseal agent"):
                await metering.sync()

    asyncio.run(twice())
    assert metering.used({"k1"}) == Usage(requests=1, items=2)  # kept for the next report, still charged
