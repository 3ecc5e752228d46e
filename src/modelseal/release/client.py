"""HTTP clients of the key service: the admin API (CLI, sealing) and the host API (the agent).

Both speak TLS 1.3 with the service's CA pinned; errors come back as :class:`ServiceError` with the
service's stable code, or ``unreachable`` when no answer came.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import Any

from modelseal.encoding import b64e
from modelseal.errors import MissingDependencyError, ServiceError
from modelseal.jsonlimits import JSONLimitError, loads_bounded
from modelseal.pki import client_context
from modelseal.release.protocol import Route

ADMIN_TOKEN_ENV = "MODELSEAL_ADMIN_TOKEN"  # noqa: S105  (a variable name)
ADMIN_TOKEN_FILE_ENV = "MODELSEAL_ADMIN_TOKEN_FILE"  # noqa: S105
CA_ENV = "MODELSEAL_KEYSERVER_CA"
_TOKEN = re.compile(r"[\x21-\x7e]{1,1024}")  # one header-safe word
MAX_ANSWER = 64 * 1024 * 1024  # an audit page of 10,000 entries is a few MiB


def require_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("talking to the key service needs httpx: pip install 'modelseal[agent]'") from None
    return httpx


def decode(response: Any) -> dict[str, Any]:
    """The JSON body of a success, or a :class:`ServiceError` carrying the service's code."""
    try:
        data = loads_bounded(response.content, max_bytes=MAX_ANSWER, max_depth=32, what="the key service's answer")
    except JSONLimitError:
        data = None
    if response.status_code >= 400 or not isinstance(data, dict):
        error = data.get("error", {}) if isinstance(data, dict) else {}
        code = error.get("code", "http_error") if isinstance(error, dict) else "http_error"
        message = error.get("message", response.reason_phrase) if isinstance(error, dict) else response.reason_phrase
        raise ServiceError(response.status_code, str(code), f"key service: {message} ({response.status_code} {code})")
    return data


def admin_token() -> str:
    """The admin token from ``$MODELSEAL_ADMIN_TOKEN`` or the file ``$MODELSEAL_ADMIN_TOKEN_FILE`` names."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    source = f"${ADMIN_TOKEN_ENV}"
    path = os.environ.get(ADMIN_TOKEN_FILE_ENV)
    if not token and path:
        source = f"the admin token file {path}"
        try:
            with open(path, "rb") as f:
                token = f.read(4096).decode("ascii", "replace").strip()
        except OSError as exc:
            raise ServiceError(0, "no_token", f"cannot read admin token file {path}: {exc.strerror}") from None
    if not token:
        raise ServiceError(0, "no_token", f"no admin token: set {ADMIN_TOKEN_ENV} or {ADMIN_TOKEN_FILE_ENV}")
    return checked_token(token, source)


def checked_token(token: str, source: str) -> str:
    """``token`` if it can travel in a header: one word of printable ASCII. Never repeats it otherwise
    (a token file pointed at a private key by mistake must not end up on a terminal)."""
    if not _TOKEN.fullmatch(token):
        raise ServiceError(
            0, "bad_token", f"{source} does not hold an admin token (one word of printable ASCII, as `init` wrote it)"
        )
    return token


def _unreachable(url: str, exc: Exception) -> ServiceError:
    """A transport failure, described without echoing the request (its headers carry the token)."""
    httpx = require_httpx()
    detail = str(exc) if isinstance(exc, (httpx.ConnectError, httpx.TimeoutException)) else type(exc).__name__
    return ServiceError(0, "unreachable", f"cannot reach the key service at {url}: {detail}")


def service_info(url: str, ca: str | None = None, timeout: float = 30) -> dict[str, Any]:
    """``GET /v1/info`` (no credentials): the lease-signing public key and the evidence kinds."""
    httpx = require_httpx()
    try:
        response = httpx.get(f"{url.rstrip('/')}{Route.INFO}", verify=client_context(ca or os.environ.get(CA_ENV)),
                             timeout=timeout)  # fmt: skip
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc) from None
    return decode(response)


class AdminClient:
    """The admin API, authenticated by bearer token over TLS."""

    def __init__(self, url: str, token: str | None = None, ca: str | None = None, timeout: float = 30) -> None:
        httpx = require_httpx()
        self.url = url.rstrip("/")
        ctx: ssl.SSLContext = client_context(ca or os.environ.get(CA_ENV))
        bearer = checked_token(token, "the admin token given") if token else admin_token()
        self._client = httpx.Client(
            base_url=self.url, verify=ctx, timeout=timeout, headers={"Authorization": f"Bearer {bearer}"}
        )
        self._errors = httpx.HTTPError

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body, params=params or None)
        except self._errors as exc:
            raise _unreachable(self.url, exc) from None
        return decode(response)

    # --- the admin API, one method per route (answers as the service sends them: docs/key-release.md)

    def add_model(self, name: str, description: str = "") -> dict[str, Any]:
        """Register model ``name``; the service refuses an empty description, so none is sent then."""
        return self.call("POST", Route.MODELS, {"model": name, **({"description": description} if description else {})})

    def models(self) -> list[dict[str, Any]]:
        return list(self.call("GET", Route.MODELS)["models"])

    def register_key(self, model: str, key: bytes | bytearray) -> str:
        """Register a data key under ``model``; its key id."""
        return str(self.call("POST", Route.ADMIN_KEYS, {"model": model, "key": b64e(bytes(key))})["key_id"])

    def add_grant(self, grant: dict[str, Any]) -> dict[str, Any]:
        """``grant``: the grant document (``model``, ``identity``, terms); the stored grant."""
        return self.call("POST", Route.GRANTS, grant)

    def grants(self, model: str | None = None) -> list[dict[str, Any]]:
        params = {"model": model} if model else {}
        return list(self.call("GET", Route.GRANTS, None, **params)["grants"])

    def revoke_grant(self, grant_id: str, reason: str = "") -> dict[str, Any]:
        return self.call("POST", Route.REVOKE.format(grant_id=grant_id), {"reason": reason})

    def rotate_master_key(self) -> dict[str, Any]:
        return self.call("POST", Route.ROTATE_MASTER_KEY)

    def audit_page(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Audit entries with ``seq > after``, at most ``limit``."""
        return list(self.call("GET", Route.AUDIT, after=after, limit=limit)["entries"])

    def usage(self, **query: Any) -> dict[str, Any]:
        """Usage per licence per period (``since``, ``until``, ``period``, ``grant``, ``model``: all optional)."""
        return self.call("GET", Route.USAGE, None, **{k: v for k, v in query.items() if v is not None})

    def reset_usage(self, host: str, log: str | None = None, reason: str = "") -> dict[str, Any]:
        body = {"host": host, **({"log": log} if log else {}), **({"reason": reason} if reason else {})}
        return self.call("POST", Route.USAGE_RESET, body)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
