"""What licences cost the key service and the agent (issue 21), each against its baseline in the same run.

- Challenge with many grants: a challenge for a host when the model has N other hosts' grants, against
  the same challenge with none (stores look grants up by the names that could match the host, not by
  reading every grant of the model). Ratio = with N / with none.
- Release carrying a usage report: a metered release whose agent reports 64 new entries (the most one
  release carries) against one whose report holds none, in the head-locked transaction. Ratio = with 64
  / with none; also per entry.
- Agent start-up: opening (verifying) a usage log of N entries, per entry.

The key service runs in process (``KeyService`` on a SQLite file store, as ``keyserver run`` uses) and the
agent's real usage log writes a real file; medians.

    python bench/licences.py [--grants 10000] [--rounds 50] [--entries 20000] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from machine import machine

from modelseal.agent.usagelog import Counted, UsageLog
from modelseal.attest import verifiers_from_config
from modelseal.encoding import b64d, b64e
from modelseal.keyserver.masterkey import LocalMasterKey
from modelseal.keyserver.service import KeyService, ServiceSettings
from modelseal.keyserver.sqlstore.store import open_store
from modelseal.pki import PeerIdentity
from modelseal.release.protocol import EphemeralKey
from modelseal.release.terms import Usage

ADMIN = {"actor": "admin"}
HOST = {"remote": "127.0.0.1", "path": "/v1/release"}


def peer(name: str) -> PeerIdentity:
    digest = hashlib.sha256(name.encode()).digest()
    return PeerIdentity("spki:" + b64e(digest), digest)


def service(directory: Path, model: str) -> tuple[KeyService, str]:
    store = open_store(f"sqlite:///{directory / 'ks.db'}")
    svc = KeyService(store, LocalMasterKey.create(directory / "master.key"), ed25519.Ed25519PrivateKey.generate(),
                     ServiceSettings(), verifiers_from_config())  # fmt: skip
    svc.add_model(model, "", ADMIN)
    return svc, str(svc.register_key(model, os.urandom(32), ADMIN)["key_id"])


def timed(call: Any, rounds: int) -> float:
    """Median seconds of ``call()``."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def challenges(directory: Path, grants: int, rounds: int) -> dict[str, float]:
    svc, key_id = service(directory, "m")
    me = peer("me")
    svc.add_grant("m", {"identity": me.spki, "evidence": []}, ADMIN)
    alone = timed(lambda: svc.challenge(me, key_id, HOST), rounds)
    for i in range(grants):
        svc.add_grant("m", {"identity": peer(f"other-{i}").spki, "evidence": []}, ADMIN)
    crowded = timed(lambda: svc.challenge(me, key_id, HOST), rounds)
    svc.close()
    return {"grants": grants, "alone_ms": alone * 1e3, "crowded_ms": crowded * 1e3, "ratio": crowded / alone}


def host_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return path


def releases(directory: Path, rounds: int) -> dict[str, float]:
    svc, key_id = service(directory, "m")
    me = peer("me")
    spec = {"identity": me.spki, "evidence": [], "terms": {"metered": True}}
    grant = str(svc.add_grant("m", spec, ADMIN)["grant_id"])
    log = UsageLog.open(directory / "usage.log", host_key(directory / "host.key"), me.spki)
    counter = iter(range(1, 10**9))

    def release(entries: int, warm_up: bool = False) -> None:
        for _ in range(entries):
            log.record("1.bench", next(counter), [Counted(key_id, grant, "m", Usage(requests=1, items=1))])
        challenge = svc.challenge(me, key_id, HOST, log.log_id)
        report = log.report(challenge["usage_seq"], b64d(challenge["nonce"]))
        assert warm_up or len(report["entries"]) == entries
        start = time.perf_counter()
        svc.release(me, key_id, challenge["nonce"], EphemeralKey().public, [], HOST, report)
        if not warm_up:
            times[entries].append(time.perf_counter() - start)

    times: dict[int, list[float]] = {0: [], 64: []}
    release(0, warm_up=True)  # the log's opening entry and the first lease
    for _ in range(rounds):
        release(0)
        release(64)
    log.close()
    svc.close()
    empty, full = statistics.median(times[0]), statistics.median(times[64])
    return {"empty_ms": empty * 1e3, "with_64_ms": full * 1e3, "ratio": full / empty,
            "per_entry_ms": (full - empty) / 64 * 1e3}  # fmt: skip


def startup(directory: Path, entries: int) -> dict[str, float]:
    key = host_key(directory / "start.key")
    log = UsageLog.open(directory / "start.log", key, "spki:bench")
    for report in range(1, entries + 1):
        log.record("1.bench", report, [Counted("k_1", "g_1", "m", Usage(requests=1, items=1))])
    log.close()
    start = time.perf_counter()
    UsageLog.open(directory / "start.log", key, "spki:bench").close()
    seconds = time.perf_counter() - start
    return {"entries": entries, "open_s": seconds, "per_entry_ms": seconds / (entries + 1) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / name for name in ("challenge", "release", "startup")]
        for d in dirs:
            d.mkdir()
        report = {
            "machine": machine(),
            "challenge": challenges(dirs[0], args.grants, args.rounds * 4),
            "release": releases(dirs[1], args.rounds),
            "startup": startup(dirs[2], args.entries),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    c, r, s = report["challenge"], report["release"], report["startup"]
    print(report["machine"])
    print(f"challenge, {c['grants']} other hosts' grants on the model: {c['crowded_ms']:.2f} ms vs "
          f"{c['alone_ms']:.2f} ms with none (x{c['ratio']:.2f})")
    print(f"metered release with 64 new usage entries: {r['with_64_ms']:.1f} ms vs {r['empty_ms']:.1f} ms with "
          f"none (x{r['ratio']:.2f}; {r['per_entry_ms']:.2f} ms per entry)")
    print(f"agent start-up, usage log of {s['entries']} entries: {s['open_s']:.2f} s ({s['per_entry_ms']:.3f} ms "
          "per entry)")  # fmt: skip


if __name__ == "__main__":
    main()
