"""Kubernetes probe for `modelseal serve` with mTLS: the kubelet's httpGet probes cannot present a client
certificate, and the server refuses connections without one.

    python3 probe.py live    GET /v2/health/live
    python3 probe.py ready   GET /v2/health/ready, then GET /v2/models/NAME/ready for each model in
                             $MODELSEAL_PROBE_MODELS (space- or comma-separated); with none listed,
                             every model of the repository index must be READY (and there must be one)

Environment: MODELSEAL_PROBE_URL (default https://127.0.0.1:8000), MODELSEAL_PROBE_CA (the server's
CA), MODELSEAL_PROBE_CERT and MODELSEAL_PROBE_KEY (a client certificate the server's --client-ca
accepts). Standard library only, so any python3 in the image runs it. Exit 0 when healthy; otherwise
one line saying why (the kubelet shows it in the pod's events) and exit 1.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 4.0


def context() -> ssl.SSLContext | None:
    """TLS checking the server against its CA (not its name: the probe dials 127.0.0.1), with the client
    certificate when one is configured; None for a plain-HTTP server."""
    url = os.environ.get("MODELSEAL_PROBE_URL", "https://127.0.0.1:8000")
    if not url.startswith("https://"):
        return None
    ca = os.environ.get("MODELSEAL_PROBE_CA")
    ctx = ssl.create_default_context(cafile=ca or None)
    ctx.check_hostname = False  # the certificate is still verified against the CA
    cert, key = os.environ.get("MODELSEAL_PROBE_CERT"), os.environ.get("MODELSEAL_PROBE_KEY")
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def call(path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; a connection failure is status 0 with the reason as the body."""
    base = os.environ.get("MODELSEAL_PROBE_URL", "https://127.0.0.1:8000").rstrip("/")
    if not base.startswith(("https://", "http://")):
        return 0, b"MODELSEAL_PROBE_URL must be an https:// or http:// URL"
    request = urllib.request.Request(base + path, data=body, method="POST" if body is not None else "GET")  # noqa: S310
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context()) as answer:  # noqa: S310 (checked)
            return answer.status, answer.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536)
    except (OSError, ValueError) as exc:
        return 0, str(getattr(exc, "reason", exc)).encode()


def reason(body: bytes) -> str:
    """The server's reason from a JSON error body, cut to one short line."""
    try:
        data = json.loads(body)
        text = str(data.get("reason") or data.get("error") or data) if isinstance(data, dict) else str(data)
    except ValueError:
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:300]


def check(path: str) -> str | None:
    status, body = call(path)
    return None if status == 200 else f"{path}: {status or 'no answer'} {reason(body)}"


def ready() -> str | None:
    problem = check("/v2/health/ready")
    if problem:
        return problem
    names = os.environ.get("MODELSEAL_PROBE_MODELS", "").replace(",", " ").split()
    for name in names:
        problem = check(f"/v2/models/{urllib.parse.quote(name, safe='')}/ready")
        if problem:
            return problem
    if names:
        return None
    status, body = call("/v2/repository/index", b"{}")
    if status != 200:
        return f"/v2/repository/index: {status or 'no answer'} {reason(body)}"
    models = json.loads(body)
    if not models:
        return "the model repository holds no model"
    waiting = [m for m in models if m.get("state") != "READY"]
    if waiting:
        first = waiting[0]
        why = " ".join(str(first.get("reason", "")).split())[:300]
        return f"model {first.get('name')} is {first.get('state')}: {why}"
    return None


def main(argv: list[str]) -> int:
    if argv[1:] == ["live"]:
        problem = check("/v2/health/live")
    elif argv[1:] == ["ready"]:
        problem = ready()
    else:
        print("usage: probe.py live|ready", file=sys.stderr)
        return 2
    if problem:
        print(problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
