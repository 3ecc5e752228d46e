"""Key-release latency and throughput of `modelseal keyserver` on loopback.

Starts a real key service (SQLite by default, `--db postgresql` for a private schema in the local
PostgreSQL, or a database URL) with real TLS and `--workers` processes (`keyserver run --workers N`; one
service per value, e.g. `--workers 1,2,4`), registers a model, key and grant, then runs N concurrent hosts
(1, 16, 64 by default), each doing full releases in a loop over its own keep-alive mTLS connection:
challenge -> release -> verify the signed lease -> unwrap the key. The hosts run in `--client-procs`
load-generator processes of their own (not the service's, not this script's). Reports p50/p99 latency and
releases/s, and, as the plain baseline measured in the same run, the latency of `GET /v1/health` over the
same connections (the HTTP + TLS floor).

The load generator runs on the same machine as the service: with few cores they compete for CPU, so the
numbers are a floor on what a separate client machine would see (`nproc` is printed with the results).

    python bench/keyserver.py [--workers 1,2,4] [--clients 1,16,64] [--seconds 5] [--db postgresql] [--json]

It also times the service's own challenge and release decisions in process (no HTTP, no TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from modelseal.devstack import KeyServer, PostgresSchema
from modelseal.encoding import b64d, b64e
from modelseal.pki import client_context, identity_of_cert_file
from modelseal.release.protocol import EphemeralKey, load_service_public_key


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_release(client: httpx.AsyncClient, key_id: str, spki_hash: bytes, service_key: object) -> None:
    challenge = (await client.post("/v1/challenge", json={"key_id": key_id})).json()
    eph = EphemeralKey()
    body = {"key_id": key_id, "nonce": challenge["nonce"], "ephemeral_key": b64e(eph.public), "evidence": []}
    answer = (await client.post("/v1/release", json=body)).json()
    _lease, dek = eph.open_release(
        answer, nonce=b64d(challenge["nonce"]), client_spki_hash=spki_hash, key_id=key_id, service_key=service_key
    )
    dek[:] = bytes(32)


async def drive(target: dict, clients: int, seconds: float, which: str) -> tuple[list[float], float]:
    """``clients`` keep-alive mTLS connections doing ``which`` ("release" or "health") for ``seconds``."""
    ctx = client_context(target["ca"], *target["cert"])
    service_key = load_service_public_key(target["lease_public_key"])
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(base_url=target["url"], verify=ctx, limits=limits, timeout=60) for _ in range(clients)]
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if which == "release":
                await one_release(client, target["key_id"], target["spki_hash"], service_key)
            else:
                (await client.get("/v1/health")).raise_for_status()
            latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(one_release(c, target["key_id"], target["spki_hash"], service_key) for c in pool))
        started = time.perf_counter()
        await asyncio.gather(*(worker(c, started + seconds) for c in pool))
        return latencies, time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))


def load_process(args: tuple[dict, int, float, str]) -> tuple[list[float], float]:
    """One load-generator process (run by a multiprocessing pool)."""
    return asyncio.run(drive(*args))


def run_level(target: dict, clients: int, seconds: float, procs: int) -> dict:
    """``clients`` hosts spread over up to ``procs`` load-generator processes: health, then releases."""
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(min(procs, clients))]
    results = {}
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        for which in ("health", "release"):
            parts = pool.map(load_process, [(target, n, seconds, which) for n in shares])
            latencies = [x for lat, _ in parts for x in lat]
            results[which] = (latencies, len(latencies) / max(elapsed for _, elapsed in parts))
    (release, release_rate), (health, health_rate) = results["release"], results["health"]
    return {
        "clients": clients,
        "releases": len(release),
        "release_p50_ms": pct(release, 0.50) * 1e3,
        "release_p99_ms": pct(release, 0.99) * 1e3,
        "releases_per_s": release_rate,
        "health_p50_ms": statistics.median(health) * 1e3,
        "health_p99_ms": pct(health, 0.99) * 1e3,
        "health_per_s": health_rate,
        "p50_ratio_vs_health": statistics.median(release) / statistics.median(health),
    }


def service_time(server: KeyServer, cert: tuple[str, str], key_id: str, rounds: int = 200) -> dict:
    """Median time of the service's own challenge and release decisions, in process (no HTTP, no TLS)."""
    from modelseal.keyserver.config import KeyServerConfig
    from modelseal.keyserver.server import build_service

    service = build_service(KeyServerConfig.load(server.config), migrate=False)
    peer = identity_of_cert_file(cert[0])
    challenge_s, release_s = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        nonce = service.challenge(peer, key_id, {"remote": "bench"})["nonce"]
        t1 = time.perf_counter()
        service.release(peer, key_id, nonce, EphemeralKey().public, [], {"remote": "bench"})
        challenge_s.append(t1 - t0)
        release_s.append(time.perf_counter() - t1)
    service.close()
    return {"challenge_ms": statistics.median(challenge_s) * 1e3, "release_ms": statistics.median(release_s) * 1e3}


def measure(database: str | None, workers: int, clients: list[int], seconds: float, procs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = KeyServer(Path(tmp) / "ks", database, workers=workers).start()
        try:
            cert = server.host_cert("bench-host")
            with server.admin() as admin:
                admin.call("POST", "/v1/admin/models", {"model": "bench"})
                key_id = admin.call("POST", "/v1/admin/keys", {"model": "bench", "key": b64e(bytes(32))})["key_id"]
                admin.call(
                    "POST", "/v1/admin/grants", {"model": "bench", "identity": identity_of_cert_file(cert[0]).spki}
                )
            target = {
                "url": server.url, "ca": server.ca, "cert": cert, "key_id": key_id,
                "spki_hash": identity_of_cert_file(cert[0]).spki_hash,
                "lease_public_key": server.info["lease_public_key"],
            }  # fmt: skip
            rows = [run_level(target, n, seconds, procs) for n in clients]
            in_process = service_time(server, cert, key_id) if workers == 1 else None
        finally:
            server.stop()
    return {"workers": workers, "levels": rows, "service_time": in_process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1", help="key-service processes, one service per value: 1,2,4")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--db", help="postgresql (a private schema in the test database) or a database URL")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    runs = []
    for workers in (int(w) for w in args.workers.split(",")):
        schema = PostgresSchema() if args.db == "postgresql" else None
        try:
            runs.append(measure(schema.url if schema else args.db, workers, clients, args.seconds, args.client_procs))
        finally:
            if schema:
                schema.drop()
    backend = "postgresql" if args.db and "postgres" in args.db else "sqlite"
    if args.json:
        print(json.dumps({"backend": backend, "cores": os.cpu_count(), "runs": runs}, indent=2))
        return
    print(f"key release on loopback, backend {backend}, {os.cpu_count()} cores shared by service and load, "
          f"{args.seconds:.0f} s per level, {args.client_procs} load processes (medians, p99)")
    print("workers clients  release p50   p99      rel/s   | health p50  p99     req/s  | p50 ratio release/health")
    for run in runs:
        for r in run["levels"]:
            print(
                f"{run['workers']:>7} {r['clients']:>7}  {r['release_p50_ms']:7.2f} ms {r['release_p99_ms']:7.2f} ms "
                f"{r['releases_per_s']:7.0f}   | {r['health_p50_ms']:6.2f} ms {r['health_p99_ms']:6.2f} ms "
                f"{r['health_per_s']:6.0f}  | {r['p50_ratio_vs_health']:.1f}x"
            )
    in_process = runs[0]["service_time"]
    if in_process:
        print(
            f"in-process service time per release (no HTTP, no TLS; medians of 200): challenge "
            f"{in_process['challenge_ms']:.2f} ms + release {in_process['release_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
