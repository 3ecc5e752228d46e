"""Key-release latency and throughput of `modelseal keyserver` on loopback.

Starts a real key service (SQLite by default, `--db postgresql://...` for PostgreSQL) with real TLS,
registers a model, key and grant, then runs N concurrent hosts (1, 16, 64 by default), each doing full
releases in a loop over its own keep-alive mTLS connection: challenge -> release -> verify the signed
lease -> unwrap the key. Reports p50/p99 latency and releases/s, and, as the plain baseline measured
in the same run, the latency of `GET /v1/health` over the same connections (the HTTP + TLS floor).

The load generator runs on the same machine as the service: on 2 cores they compete for CPU, so the
numbers are a floor on what a separate client machine would see.

    python bench/keyserver.py [--clients 1,16,64] [--seconds 5] [--db URL] [--json]

It also times the service's own challenge and release decisions in process (no HTTP, no TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def run_level(server: KeyServer, cert: tuple[str, str], key_id: str, clients: int, seconds: float) -> dict:
    ctx = client_context(server.ca, *cert)
    spki_hash = identity_of_cert_file(cert[0]).spki_hash
    service_key = load_service_public_key(server.info["lease_public_key"])
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(base_url=server.url, verify=ctx, limits=limits, timeout=30) for _ in range(clients)]
    release_lat: list[float] = []
    health_lat: list[float] = []

    async def worker(client: httpx.AsyncClient, deadline: float, which: str) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if which == "release":
                await one_release(client, key_id, spki_hash, service_key)
                release_lat.append(time.perf_counter() - t0)
            else:
                (await client.get("/v1/health")).raise_for_status()
                health_lat.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(one_release(c, key_id, spki_hash, service_key) for c in pool))  # warm connections
        for which in ("health", "release"):
            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(*(worker(c, deadline, which) for c in pool))
            elapsed = time.perf_counter() - started
            if which == "health":
                health_rate = len(health_lat) / elapsed
            else:
                release_rate = len(release_lat) / elapsed
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return {
        "clients": clients,
        "releases": len(release_lat),
        "release_p50_ms": pct(release_lat, 0.50) * 1e3,
        "release_p99_ms": pct(release_lat, 0.99) * 1e3,
        "releases_per_s": release_rate,
        "health_p50_ms": statistics.median(health_lat) * 1e3,
        "health_p99_ms": pct(health_lat, 0.99) * 1e3,
        "health_per_s": health_rate,
        "p50_ratio_vs_health": statistics.median(release_lat) / statistics.median(health_lat),
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
    service.engine.dispose()
    return {"challenge_ms": statistics.median(challenge_s) * 1e3, "release_ms": statistics.median(release_s) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--db", help="postgresql (a private schema in the test database) or a database URL")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    schema = PostgresSchema() if args.db == "postgresql" else None
    database = schema.url if schema else args.db
    with tempfile.TemporaryDirectory() as tmp:
        server = KeyServer(Path(tmp) / "ks", database).start()
        try:
            cert = server.host_cert("bench-host")
            with server.admin() as admin:
                admin.call("POST", "/v1/admin/models", {"model": "bench"})
                key_id = admin.call("POST", "/v1/admin/keys", {"model": "bench", "key": b64e(bytes(32))})["key_id"]
                admin.call(
                    "POST", "/v1/admin/grants", {"model": "bench", "identity": identity_of_cert_file(cert[0]).spki}
                )
            rows = [asyncio.run(run_level(server, cert, key_id, int(n), args.seconds)) for n in args.clients.split(",")]
            in_process = service_time(server, cert, key_id)
        finally:
            server.stop()
            if schema:
                schema.drop()
    backend = "postgresql" if database and "postgres" in database else "sqlite"
    if args.json:
        print(json.dumps({"backend": backend, "levels": rows, "service_time": in_process}, indent=2))
        return
    print(f"key release on loopback, backend {backend}, {args.seconds:.0f} s per level (medians, p99)")
    print("clients  release p50   p99      rel/s   | health p50  p99     req/s  | p50 ratio release/health")
    for r in rows:
        print(
            f"{r['clients']:>7}  {r['release_p50_ms']:7.2f} ms {r['release_p99_ms']:7.2f} ms {r['releases_per_s']:7.0f}"
            f"   | {r['health_p50_ms']:6.2f} ms {r['health_p99_ms']:6.2f} ms {r['health_per_s']:6.0f}"
            f"  | {r['p50_ratio_vs_health']:.1f}x"
        )
    print(
        f"in-process service time per release (no HTTP, no TLS; medians of 200): challenge "
        f"{in_process['challenge_ms']:.2f} ms + release {in_process['release_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
