"""The key service's OpenAPI 3.1 document (served at ``/openapi.json``; the fuzz tests run from it)."""

from __future__ import annotations

from typing import Any

_B64 = {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_EVIDENCE = {
    "type": "array",
    "maxItems": 8,
    "items": {"type": "object", "required": ["kind"], "properties": {"kind": {"type": "string"}}},
}
_TERMS = {
    "type": "object",
    "description": "licence terms (docs/licensing.md); unknown keys are refused",
    "properties": {
        "metered": {"type": "boolean"},
        "period_s": {"type": "integer", "minimum": 10},
        "max_requests": {"type": "integer", "minimum": 0},
        "max_items": {"type": "integer", "minimum": 0},
        "max_tokens": {"type": "integer", "minimum": 0},
        "rate": {"type": "number", "exclusiveMinimum": 0},
        "report_grace_s": {"type": "integer", "minimum": 0},
        "licence": {"type": "string", "maxLength": 128},
    },
    "additionalProperties": False,
}
_USAGE_REPORT = {
    "type": "object",
    "description": "the agent's usage report: signed log lines after the acknowledged entry, and a head statement",
    "properties": {
        "entries": {"type": "array", "maxItems": 64, "items": {"type": "string"}},
        "head": {"type": "object"},
    },
}
_USAGE_QUERY = [
    *({"name": name, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0,
       "maximum": 2**53 - 1}} for name in ("since", "until")),
    *({"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
      for name in ("period", "grant", "model")),
]  # fmt: skip
_GRANT = {
    "type": "object",
    "required": ["grant_id", "model", "identity", "evidence"],
    "properties": {
        "grant_id": {"type": "string"},
        "model": {"type": "string"},
        "identity": {"type": "string"},
        "evidence": _EVIDENCE,
        "releases": {"type": "integer"},
        "terms": _TERMS,
    },
}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...],
    body: dict[str, Any] | None = None,
    ok_status: str = "200",
    admin: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok_status: {"description": "success", "content": {"application/json": {"schema": ok}}}}
    for status in errors:
        responses[str(status)] = {"description": "refused", "content": {"application/json": {"schema": _ERROR}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if admin:
        op["security"] = [{"adminToken": []}]
    return op


_HOST = (400, 401, 403, 404, 409, 413)
_ADMIN = (400, 401, 404, 409, 413)


def openapi_document() -> dict[str, Any]:
    release_ok = _obj(
        ["lease", "signature", "wrapped_key"],
        lease=_B64,
        signature=_B64,
        wrapped_key=_B64,
        grant_id={"type": "string"},
        lease_id={"type": "string"},
        expires_at={"type": "integer"},
        attested={"type": "object", "description": "measurements proven by each evidence kind"},
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelseal key service", "version": "1"},
        "components": {"securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/health": {"get": _op("liveness", _obj(["status"], status={"type": "string"}), ())},
            "/v1/ready": {
                "get": _op("readiness: the database answers", _obj(["status"], status={"type": "string"}), (503,))
            },
            "/v1/info": {
                "get": _op(
                    "lease-signing key and evidence kinds",
                    _obj(
                        ["lease_public_key"],
                        lease_public_key={"type": "string"},
                        evidence_kinds={"type": "array", "items": {"type": "string"}},
                    ),
                    (),
                )
            },
            "/v1/challenge": {
                "post": _op(
                    "fresh single-use nonce for one key (mTLS)",
                    _obj(
                        ["nonce", "expires_at"],
                        nonce=_B64,
                        expires_at={"type": "integer"},
                        evidence={"type": "array", "items": {"type": "string"}},
                        usage_seq={"type": "integer", "description": "the host's last usage entry accepted"},
                    ),
                    _HOST,
                    _obj(["key_id"], key_id={"type": "string", "maxLength": 64},
                         usage_log={"type": "string", "maxLength": 64}),
                )
            },
            "/v1/release": {
                "post": _op(
                    "release one key wrapped to an ephemeral key, with a signed lease (mTLS)",
                    release_ok,
                    _HOST,
                    _obj(
                        ["key_id", "nonce", "ephemeral_key"],
                        key_id={"type": "string"},
                        nonce=_B64,
                        ephemeral_key=_B64,
                        evidence=_EVIDENCE,
                        usage=_USAGE_REPORT,
                    ),
                )
            },
            "/v1/keys": {
                "get": _op(
                    "key ids this host is granted (mTLS)",
                    _obj(["host", "keys"], host={"type": "string"}, keys={"type": "array"}),
                    (401, 403),
                )
            },
            "/v1/admin/models": {
                "post": _op(
                    "register a model",
                    _obj(["model"], model={"type": "string"}),
                    _ADMIN,
                    _obj(["model"], model={"type": "string"}, description={"type": "string"}),
                    "201",
                    True,
                ),
                "get": _op("list models", _obj(["models"], models={"type": "array"}), (401,), admin=True),
            },
            "/v1/admin/keys": {
                "post": _op(
                    "register a data key for a model (sealing does this)",
                    _obj(["key_id", "model"], key_id={"type": "string"}, model={"type": "string"}),
                    _ADMIN,
                    _obj(["model", "key"], model={"type": "string"}, key=_B64),
                    "201",
                    True,
                )
            },
            "/v1/admin/grants": {
                "post": _op(
                    "grant a host identity access to a model's keys",
                    _GRANT,
                    _ADMIN,
                    _obj(
                        ["model", "identity"],
                        model={"type": "string"},
                        identity={"type": "string"},
                        not_before={"type": "integer"},
                        not_after={"type": "integer"},
                        max_hosts={"type": "integer"},
                        max_releases={"type": "integer"},
                        grace_s={"type": "integer"},
                        policy={"type": "string"},
                        evidence=_EVIDENCE,
                        terms=_TERMS,
                    ),
                    "201",
                    True,
                ),
                "get": _op(
                    "list grants",
                    _obj(["grants"], grants={"type": "array", "items": _GRANT}),
                    (400, 401),
                    admin=True,
                    parameters=[{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}],
                ),
            },
            "/v1/admin/grants/{grant_id}/revoke": {
                "post": _op(
                    "revoke a grant: hosts drop the key at their next renewal",
                    _obj(["grant_id", "revoked"], grant_id={"type": "string"}, revoked={"type": "boolean"}),
                    _ADMIN,
                    _obj([], reason={"type": "string"}),
                    admin=True,
                    parameters=[{"name": "grant_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                )
            },
            "/v1/admin/master-key/rotate": {
                "post": _op(
                    "new master-key version; every stored key re-wrapped",
                    _obj(["version", "rewrapped"], version={"type": "string"}, rewrapped={"type": "integer"}),
                    (401,),
                    admin=True,
                )
            },
            "/v1/admin/usage": {
                "get": _op(
                    "usage per licence (grant) per period, from the hosts' accepted usage reports",
                    _obj(["since", "until", "period_s", "usage"], since={"type": "integer"}, until={"type": "integer"},
                         period_s={"type": "integer"}, usage={"type": "array"}),
                    (400, 401),
                    admin=True,
                    parameters=_USAGE_QUERY,
                )
            },
            "/v1/admin/usage/reset": {
                "post": _op(
                    "forget a host's usage-log head (its next report may start a new chain)",
                    _obj(["host", "reset"], host={"type": "string"}, reset={"type": "integer"}),
                    _ADMIN,
                    _obj(["host"], host={"type": "string", "maxLength": 100}, log={"type": "string", "maxLength": 64},
                         reason={"type": "string"}),
                    admin=True,
                )
            },
            "/v1/admin/audit": {
                "get": _op(
                    "audit log entries after a sequence number",
                    _obj(["entries"], entries={"type": "array"}),
                    (400, 401),
                    admin=True,
                    parameters=[
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        },
                    ],
                )
            },
        },
    }
