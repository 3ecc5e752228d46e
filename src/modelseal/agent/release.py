"""The agent's client of the key service's host API: challenge, evidence, release, verify, unwrap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, Protocol

from modelseal.attest import Collector, EvidenceError, collectors_from_config
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, ServiceError
from modelseal.pki import client_context, identity_of_cert_file
from modelseal.release.client import decode, require_httpx
from modelseal.release.protocol import EphemeralKey, Lease, Route, binding, load_service_public_key


def collect(
    collectors: Mapping[str, Collector], kinds: list[str], binding: bytes, nonce: bytes
) -> list[dict[str, Any]]:
    """Evidence of every requested kind this host can produce (the service refuses what is missing)."""
    return [collectors[k](binding, nonce) for k in dict.fromkeys(kinds) if k in collectors]


class UsageReporter(Protocol):
    """What a release needs of the agent's usage log (:class:`modelseal.agent.usagelog.UsageLog`)."""

    @property
    def log_id(self) -> str: ...

    def report(self, after: int, nonce: bytes) -> dict[str, Any]: ...


class ReleaseClient:
    def __init__(
        self,
        url: str,
        *,
        ca: str | os.PathLike[str],
        cert: str,
        key: str,
        service_key: str | None = None,
        evidence: list[str] | None = None,
        collectors: Mapping[str, Collector] | None = None,
        timeout: float = 10,
    ) -> None:
        httpx = require_httpx()
        self.url = url.rstrip("/")
        self.identity = identity_of_cert_file(cert)
        self._http = httpx.AsyncClient(base_url=self.url, verify=client_context(ca, cert, key), timeout=timeout)
        self._errors = httpx.HTTPError
        self._service_key = load_service_public_key(service_key) if service_key else None
        self.evidence = evidence or ["mtls"]
        self.collectors = collectors if collectors is not None else collectors_from_config(self.evidence, {})

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, json=body)
        except self._errors as exc:
            raise ServiceError(0, "unreachable", f"cannot reach the key service at {self.url}: {exc}") from None
        return decode(response)

    async def service_key(self) -> Any:
        """The pinned lease-signing key, or the one the (TLS-authenticated) service publishes."""
        if self._service_key is None:
            info = await self._call("GET", Route.INFO)
            self._service_key = load_service_public_key(str(info.get("lease_public_key", "")))
        return self._service_key

    async def granted_keys(self) -> list[dict[str, str]]:
        """``[{"key_id": ..., "model": ...}]``: every key of every model a live grant gives this host."""
        keys = (await self._call("GET", Route.KEYS)).get("keys")
        if not isinstance(keys, list) or not all(
            isinstance(item, dict) and isinstance(item.get("key_id"), str) and isinstance(item.get("model"), str)
            for item in keys
        ):
            raise ServiceError(0, "bad_answer", f"the key service at {self.url} sent a malformed list of granted keys")
        return [{"key_id": item["key_id"], "model": item["model"]} for item in keys]

    async def fetch(self, key_id: str, usage: UsageReporter | None = None) -> tuple[Lease, bytearray]:
        """One full exchange for ``key_id``; raises :class:`ServiceError` or :class:`KeyReleaseError`.

        With ``usage`` (the agent's usage log) the challenge names the log and the release carries
        ``usage.report(acknowledged, nonce)``: the entries after the one the key service acknowledged
        in its challenge, and a head statement signed with the nonce."""
        service_key = await self.service_key()
        asked: dict[str, Any] = {"key_id": key_id} if usage is None else {"key_id": key_id, "usage_log": usage.log_id}
        challenge = await self._call("POST", Route.CHALLENGE, asked)
        try:
            nonce = b64d(challenge.get("nonce"), what="nonce", length=32)
        except FormatError as exc:
            raise ServiceError(0, "bad_answer", f"the key service sent a malformed challenge: {exc}") from None
        ephemeral = EphemeralKey()
        bind = binding(nonce, self.identity.spki_hash, ephemeral.public)
        kinds = [*self.evidence, *(challenge.get("evidence") or [])]
        try:  # TPM and TEE tools block (tens of ms): keep them off the event loop
            evidence = await asyncio.to_thread(collect, self.collectors, kinds, bind, nonce)
        except EvidenceError as exc:
            raise ServiceError(0, "evidence_unavailable", f"cannot collect evidence on this host: {exc}") from None
        body: dict[str, Any] = {
            "key_id": key_id, "nonce": b64e(nonce), "ephemeral_key": b64e(ephemeral.public), "evidence": evidence,
        }  # fmt: skip
        if usage is not None:
            acknowledged = challenge.get("usage_seq", 0)
            body["usage"] = usage.report(acknowledged if isinstance(acknowledged, int) else 0, nonce)
        answer = await self._call("POST", Route.RELEASE, body)
        return ephemeral.open_release(
            answer, nonce=nonce, client_spki_hash=self.identity.spki_hash, key_id=key_id, service_key=service_key
        )

    async def close(self) -> None:
        await self._http.aclose()
