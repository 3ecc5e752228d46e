"""The key service's decisions, independent of HTTP: registration, grants, challenges, releases.

Each public method runs in one database transaction that locks the audit head first (see
:mod:`modelseal.keyserver.sqlstore.db`), so a decision, its side effects (nonce spent, release counted, host
recorded, lease stored) and its audit record commit together or not at all. A refusal is a
:class:`Refused` carrying the HTTP status and a stable code; it is audited and committed (a spent
nonce stays spent) before it propagates. Past a burst, refusals are counted instead of written one
by one (:mod:`modelseal.keyserver.refusals`), so a flood cannot fill the disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Connection, Engine, Row, delete, func, select, update

from modelseal.attest import Claims, EvidenceError, VerificationContext, get_verifier
from modelseal.attest import verifiers as _verifiers  # noqa: F401  (registers the built-in verifiers)
from modelseal.attest.base import known_kinds, unmet
from modelseal.crypto.keys import wipe
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, ModelsealError
from modelseal.keyserver import auditchain as audit
from modelseal.keyserver.identity import identity_matches, parse_grant_identity
from modelseal.keyserver.masterkey import MasterKey
from modelseal.keyserver.policy import Policy, PolicyError
from modelseal.keyserver.refusals import RefusalLimiter, RefusalSettings
from modelseal.keyserver.sqlstore import schema
from modelseal.pki import PeerIdentity
from modelseal.release.protocol import MODEL_NAME, Lease, binding, new_nonce, now, seal_release

T = TypeVar("T")
log = logging.getLogger("modelseal.keyserver")


class Refused(ModelsealError):  # noqa: N818  (a decision, not a bug)
    """A request the service turns down: HTTP ``status``, stable ``code``, message for the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ServiceSettings:
    lease_ttl_s: int = 300
    renew_after_s: int = 60
    challenge_ttl_s: int = 60
    default_grace_s: int = 600


def _new_id(prefix: str) -> str:
    return f"{prefix}_{b64e(os.urandom(12))}"


MAX_EVIDENCE = 8


def verify_presented(evidence: list[dict[str, Any]], ctx: VerificationContext) -> dict[str, Claims | str]:
    """Verify each piece of presented evidence once: claims by kind, or why that kind was rejected."""
    if len(evidence) > MAX_EVIDENCE:
        raise Refused(400, "bad_request", f"at most {MAX_EVIDENCE} pieces of evidence per release")
    results: dict[str, Claims | str] = {}
    # mtls comes from the TLS handshake itself, whether or not the host lists it
    for piece in [{"kind": "mtls"}, *(p for p in evidence if p.get("kind") != "mtls")]:
        kind = str(piece.get("kind"))
        verifier = get_verifier(kind)
        if kind in results:
            raise Refused(400, "bad_request", f"{kind} evidence presented twice")
        if verifier is None:
            results[kind] = f"no verifier for {kind} evidence is installed (known: {', '.join(known_kinds())})"
            continue
        try:
            claims = verifier.verify(piece, ctx)
        except (EvidenceError, FormatError) as exc:
            results[kind] = f"{kind} evidence rejected: {exc}"
            continue
        except Exception as exc:  # a verifier bug must refuse, never release (and never answer 500)
            log.exception("the %s verifier failed", kind)
            results[kind] = f"{kind} evidence could not be verified ({type(exc).__name__})"
            continue
        if not claims.report_data_bound:
            why = claims.details.get("binding_mismatch", "")
            results[kind] = f"{kind} evidence is not bound to this exchange" + (f" ({why})" if why else "")
        else:
            results[kind] = claims
    return results


def check_requirements(required: list[dict[str, Any]], verified: dict[str, Claims | str]) -> dict[str, Any]:
    """Match a grant's requirements (``mtls`` always) against verified claims; return claims by kind."""
    claims: dict[str, Any] = {}
    for req in [{"kind": "mtls"}, *required]:
        kind = req["kind"]
        result = verified.get(kind)
        if result is None:
            raise Refused(403, "evidence_required", f"the grant requires {kind} evidence, none was presented")
        if isinstance(result, str):
            raise Refused(403, "evidence_rejected", result)
        problem = unmet(req, result)
        if problem:
            raise Refused(403, "evidence_rejected", problem)
        claims[kind] = result.to_json()
    return claims


class KeyService:
    def __init__(
        self,
        engine: Engine,
        master: MasterKey,
        signer: ed25519.Ed25519PrivateKey,
        settings: ServiceSettings,
        refusals: RefusalSettings | None = None,
    ) -> None:
        self.engine, self.master, self.signer, self.settings = engine, master, signer, settings
        self.refusals = RefusalLimiter(refusals)

    # --- transactions --------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[tuple[Connection, tuple[int, str]]]:
        with self.engine.begin() as conn:
            yield conn, audit.lock_head(conn)

    def _decide(self, event: dict[str, Any], body: Callable[[Connection], T], audit_success: bool = True) -> T:
        """Run ``body`` in a transaction and audit the outcome; refusals are audited and committed too."""
        with self._tx() as (conn, head):
            try:
                result = body(conn)
            except Refused as refusal:
                record = {**event, "decision": "refused", "code": refusal.code, "why": str(refusal)}
                if self.refusals.admit(record):  # else counted; side effects (a spent nonce) commit anyway
                    audit.append(conn, head, record)
                saved = refusal
            else:
                if not audit_success:
                    return result
                extra = result if isinstance(result, dict) else {}
                public = {k: v for k, v in extra.items() if k in _AUDITED_RESULT_FIELDS}
                audit.append(conn, head, {**event, "decision": "ok", **public})
                return result
        raise saved

    def audit_refusal(self, event: dict[str, Any], status: int, code: str, message: str) -> Refused:
        """Record a request refused before it reached a decision (malformed, unauthenticated...)."""
        record = {**event, "decision": "refused", "code": code, "why": message}
        if self.refusals.admit(record):
            with self._tx() as (conn, head):
                audit.append(conn, head, record)
        return Refused(status, code, message)

    def flush_refusals(self) -> int:
        """Append one summary entry per refusal count past the burst; return how many were written."""
        summaries = self.refusals.drain()
        if not summaries:
            return 0
        try:
            with self._tx() as (conn, head):
                for summary in summaries:
                    head = audit.append(conn, head, summary)
        except BaseException:
            self.refusals.requeue(summaries)
            raise
        return len(summaries)

    # --- admin -----------------------------------------------------------------------------------

    def add_model(self, name: str, description: str, actor: dict[str, Any]) -> dict[str, Any]:
        if not MODEL_NAME.fullmatch(name):
            raise Refused(400, "bad_request", f"model name {name[:80]!r} must match {MODEL_NAME.pattern}")

        def body(conn: Connection) -> dict[str, Any]:
            if conn.execute(select(schema.models.c.name).where(schema.models.c.name == name)).first():
                raise Refused(409, "exists", f"model {name} is already registered")
            conn.execute(schema.models.insert().values(name=name, description=description, created_at=now()))
            return {"model": name, "description": description}

        return self._decide({"event": "model.add", "model": name, **actor}, body)

    def list_models(self) -> list[dict[str, Any]]:
        counts = select(schema.keys.c.model, func.count().label("n")).group_by(schema.keys.c.model).subquery()
        query = (
            select(schema.models, func.coalesce(counts.c.n, 0).label("keys"))
            .outerjoin(counts, counts.c.model == schema.models.c.name)
            .order_by(schema.models.c.name)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def register_key(self, model: str, dek: bytes, actor: dict[str, Any]) -> dict[str, Any]:
        if len(dek) != 32:
            raise Refused(400, "bad_request", "a data key must be 32 bytes")
        key_id = _new_id("k")

        def body(conn: Connection) -> dict[str, Any]:
            self._model(conn, model)
            wrapped, version = self.master.wrap(dek, key_id)
            conn.execute(
                schema.keys.insert().values(
                    key_id=key_id, model=model, wrapped=wrapped, wrap_version=version, created_at=now()
                )
            )
            return {"key_id": key_id, "model": model}

        return self._decide({"event": "key.register", "model": model, **actor}, body)

    @staticmethod
    def _requirement(req: dict[str, Any]) -> dict[str, Any]:
        verifier = get_verifier(req["kind"])
        if verifier is None:
            raise Refused(400, "bad_request", f"unknown evidence kind {req['kind']!r} (known: {known_kinds()})")
        try:
            return verifier.check_requirement(req)
        except EvidenceError as exc:
            raise Refused(400, "bad_request", str(exc)) from None

    def add_grant(self, model: str, spec: dict[str, Any], actor: dict[str, Any]) -> dict[str, Any]:
        """Grant ``spec["identity"]`` access to ``model``'s keys (other fields validated by the HTTP layer).

        The identity is stored in canonical form (:mod:`modelseal.keyserver.identity`); one that names
        no host (a URI spelled like a key hash, dot segments, ...) is refused and audited."""
        spec = {**spec, "evidence": [self._requirement(req) for req in spec["evidence"]]}
        if spec.get("policy"):
            try:
                Policy(spec["policy"])
            except PolicyError as exc:
                raise Refused(400, "bad_policy", str(exc)) from None
        grant_id = _new_id("g")

        def body(conn: Connection) -> dict[str, Any]:
            try:
                identity = parse_grant_identity(spec["identity"]).text
            except ModelsealError as exc:
                raise Refused(400, "bad_identity", str(exc)) from None
            self._model(conn, model)
            row = {
                "grant_id": grant_id,
                "model": model,
                "identity": identity,
                "not_before": spec.get("not_before"),
                "not_after": spec.get("not_after"),
                "max_hosts": spec.get("max_hosts"),
                "max_releases": spec.get("max_releases"),
                "releases": 0,
                "policy": spec.get("policy"),
                "evidence": json.dumps(spec["evidence"]),
                "grace_s": spec.get("grace_s", self.settings.default_grace_s),
                "created_at": now(),
            }
            conn.execute(schema.grants.insert().values(**row))
            return _grant_json(row)

        return self._decide({"event": "grant.add", "model": model, "identity": spec["identity"], **actor}, body)

    def list_grants(self, model: str | None = None) -> list[dict[str, Any]]:
        query = select(schema.grants).order_by(schema.grants.c.created_at, schema.grants.c.grant_id)
        if model:
            query = query.where(schema.grants.c.model == model)
        with self.engine.connect() as conn:
            hosts: dict[str, int] = dict(
                conn.execute(
                    select(schema.grant_hosts.c.grant_id, func.count()).group_by(schema.grant_hosts.c.grant_id)
                )
                .tuples()
                .all()
            )
            return [{**_grant_json(r._mapping), "hosts": hosts.get(r.grant_id, 0)} for r in conn.execute(query)]

    def revoke_grant(self, grant_id: str, reason: str, actor: dict[str, Any]) -> dict[str, Any]:
        def body(conn: Connection) -> dict[str, Any]:
            row = conn.execute(select(schema.grants).where(schema.grants.c.grant_id == grant_id)).first()
            if row is None:
                raise Refused(404, "unknown_grant", f"no grant {grant_id}")
            if row.revoked_at is None:
                conn.execute(
                    update(schema.grants)
                    .where(schema.grants.c.grant_id == grant_id)
                    .values(revoked_at=now(), revoke_reason=reason)
                )
            return {"grant_id": grant_id, "model": row.model, "revoked": True}

        return self._decide({"event": "grant.revoke", "grant_id": grant_id, "reason": reason, **actor}, body)

    def rotate_master_key(self, actor: dict[str, Any]) -> dict[str, Any]:
        """New master-key version, every stored key re-wrapped under it in one transaction."""
        version = self.master.rotate()

        def body(conn: Connection) -> dict[str, Any]:
            rows = conn.execute(select(schema.keys.c.key_id, schema.keys.c.wrapped, schema.keys.c.wrap_version)).all()
            for key_id, wrapped, old in rows:
                blob, new = self.master.rewrap(bytes(wrapped), old, key_id)
                conn.execute(
                    update(schema.keys).where(schema.keys.c.key_id == key_id).values(wrapped=blob, wrap_version=new)
                )
            return {"version": version, "rewrapped": len(rows)}

        result = self._decide({"event": "master_key.rotate", **actor}, body)
        self.master.retire_old()
        return result

    def audit_log(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Audit entries after ``after``; refusal counts not yet written are written first."""
        self.flush_refusals()
        with self.engine.connect() as conn:
            return audit.entries(conn, after, limit)

    # --- hosts -----------------------------------------------------------------------------------

    def granted_keys(self, peer: PeerIdentity) -> list[dict[str, Any]]:
        """Key ids of every model some live grant gives this host (what an agent may prefetch)."""
        t = now()
        with self.engine.connect() as conn:
            grants = conn.execute(select(schema.grants).where(schema.grants.c.revoked_at.is_(None))).all()
            models = sorted(
                {
                    g.model
                    for g in grants
                    if identity_matches(g.identity, peer) and (g.not_after is None or g.not_after > t)
                }
            )
            rows = conn.execute(
                select(schema.keys.c.key_id, schema.keys.c.model).where(schema.keys.c.model.in_(models))
            ).all()
        return [{"key_id": k, "model": m} for k, m in rows]

    def challenge(self, peer: PeerIdentity, key_id: str, actor: dict[str, Any]) -> dict[str, Any]:
        nonce = new_nonce()

        def body(conn: Connection) -> dict[str, Any]:
            key = self._key(conn, key_id)
            t = now()
            conn.execute(delete(schema.challenges).where(schema.challenges.c.expires_at < t - 3600))
            conn.execute(
                schema.challenges.insert().values(
                    nonce=b64e(nonce), host=peer.spki, key_id=key_id, expires_at=t + self.settings.challenge_ttl_s
                )
            )
            kinds: set[str] = set()
            for g in self._grants_for(conn, key.model, peer):
                kinds.update(req["kind"] for req in json.loads(g.evidence))
            return {"nonce": b64e(nonce), "expires_at": t + self.settings.challenge_ttl_s, "evidence": sorted(kinds)}

        return self._decide({"event": "challenge", "key_id": key_id, "host": peer.spki, **actor}, body, False)

    def release(
        self,
        peer: PeerIdentity,
        key_id: str,
        nonce_text: str,
        ephemeral_public: bytes,
        evidence: list[dict[str, Any]],
        actor: dict[str, Any],
    ) -> dict[str, Any]:
        """Decide one release (steps in docs/key-release.md) and build the signed, wrapped answer.

        The evidence is verified first, outside the transaction (signature and certificate checks take
        milliseconds and must not hold the audit-head lock); the nonce it is bound to is spent inside."""
        early: Refused | None = None
        try:
            nonce_bytes = b64d(nonce_text, what="nonce", length=32)
        except FormatError:
            nonce_bytes = b""  # refused (and audited) when the transaction tries to spend it
        ctx = VerificationContext(peer, binding(nonce_bytes, peer.spki_hash, ephemeral_public), nonce_bytes, now())
        try:
            verified = verify_presented(evidence, ctx)
        except Refused as refusal:
            early, verified = refusal, {}

        def body(conn: Connection) -> dict[str, Any]:
            key = self._key(conn, key_id)
            self._spend_nonce(conn, nonce_text, peer, key_id, now())
            if early is not None:
                raise early
            candidates = self._grants_for(conn, key.model, peer, include_revoked=True)
            if not candidates:
                raise Refused(403, "not_granted", f"host {peer.spki} holds no grant for model {key.model}")
            refusals = []
            for grant in candidates:
                try:
                    return self._grant_release(conn, grant, key, peer, ctx, ephemeral_public, verified)
                except Refused as refusal:
                    refusals.append(refusal)
            raise refusals[0]

        event = {"event": "release", "key_id": key_id, "host": peer.spki, **actor}
        return self._decide(event, body)

    def _grant_release(
        self,
        conn: Connection,
        grant: Row[Any],
        key: Row[Any],
        peer: PeerIdentity,
        ctx: VerificationContext,
        ephemeral_public: bytes,
        verified: dict[str, Claims | str],
    ) -> dict[str, Any]:
        t = ctx.now
        assert ctx.binding is not None  # always set for a release (None only for offline inspection)
        gid = grant.grant_id
        if grant.revoked_at is not None:
            raise Refused(403, "revoked", f"grant {gid} for model {grant.model} was revoked: {grant.revoke_reason}")
        if grant.not_before is not None and t < grant.not_before:
            raise Refused(403, "not_yet_valid", f"grant {gid} is valid only from {grant.not_before} (Unix time)")
        if grant.not_after is not None and t >= grant.not_after:
            raise Refused(403, "expired", f"grant {gid} expired at {grant.not_after} (Unix time)")
        if grant.max_releases is not None and grant.releases >= grant.max_releases:
            raise Refused(403, "release_limit", f"grant {gid} has used all {grant.max_releases} releases")
        hosts = {
            h for (h,) in conn.execute(select(schema.grant_hosts.c.host).where(schema.grant_hosts.c.grant_id == gid))
        }
        new_host = peer.spki not in hosts
        if new_host and grant.max_hosts is not None and len(hosts) >= grant.max_hosts:
            raise Refused(403, "host_limit", f"grant {gid} is already used by its maximum of {grant.max_hosts} hosts")
        claims = check_requirements(json.loads(grant.evidence), verified)
        if grant.policy:
            licence = {
                "releases": grant.releases,
                "max_releases": grant.max_releases or 0,
                "hosts": len(hosts | {peer.spki}),
                "max_hosts": grant.max_hosts or 0,
            }
            variables = {
                "identity": list(peer.names()),
                "host": peer.spki,
                "model": grant.model,
                "key_id": key.key_id,
                "licence": licence,
                "claims": claims,
                "now": t,
            }
            try:
                allowed = Policy(grant.policy).allows(variables)
            except PolicyError as exc:
                raise Refused(403, "policy_error", f"grant {gid} policy failed to evaluate: {exc}") from None
            if not allowed:
                raise Refused(403, "policy_denied", f"grant {gid} policy denies this release")
        dek = self.master.unwrap(bytes(key.wrapped), key.wrap_version, key.key_id)
        try:
            expires = t + self.settings.lease_ttl_s
            if grant.not_after is not None:
                expires = min(expires, grant.not_after)
            lease = Lease(
                lease_id=_new_id("l"),
                key_id=key.key_id,
                model=grant.model,
                grant_id=gid,
                host=peer.spki,
                issued_at=t,
                renew_after=min(t + self.settings.renew_after_s, expires),
                expires_at=expires,
                grace_s=grant.grace_s,
                binding=b64e(ctx.binding),
            )
            answer = seal_release(dek, lease, ephemeral_public, self.signer)
        finally:
            wipe(dek)
        conn.execute(
            schema.leases.insert().values(
                lease_id=lease.lease_id,
                grant_id=gid,
                key_id=key.key_id,
                host=peer.spki,
                issued_at=t,
                expires_at=expires,
            )
        )
        conn.execute(
            update(schema.grants).where(schema.grants.c.grant_id == gid).values(releases=schema.grants.c.releases + 1)
        )
        if new_host:
            conn.execute(schema.grant_hosts.insert().values(grant_id=gid, host=peer.spki, first_seen=t))
        # what was attested, for the audit trail: the measurements each verifier proved (mtls: the host key)
        attested = {kind: c["measurements"] for kind, c in claims.items() if kind != "mtls"}
        return {**answer, "grant_id": gid, "lease_id": lease.lease_id, "expires_at": expires, "attested": attested}

    # --- lookups ---------------------------------------------------------------------------------

    def _model(self, conn: Connection, model: str) -> None:
        if conn.execute(select(schema.models.c.name).where(schema.models.c.name == model)).first() is None:
            raise Refused(
                404, "unknown_model", f"model {model} is not registered: `modelseal keyserver model add {model}` first"
            )

    def _key(self, conn: Connection, key_id: str) -> Row[Any]:
        row = conn.execute(select(schema.keys).where(schema.keys.c.key_id == key_id)).first()
        if row is None:
            raise Refused(404, "unknown_key", f"no key {key_id} is registered with this key service")
        return row

    def _grants_for(
        self, conn: Connection, model: str, peer: PeerIdentity, include_revoked: bool = False
    ) -> list[Row[Any]]:
        query = select(schema.grants).where(schema.grants.c.model == model)
        if not include_revoked:
            query = query.where(schema.grants.c.revoked_at.is_(None))
        rows = conn.execute(query.order_by(schema.grants.c.created_at.desc(), schema.grants.c.grant_id)).all()
        return [g for g in rows if identity_matches(g.identity, peer)]

    def _spend_nonce(self, conn: Connection, nonce_text: str, peer: PeerIdentity, key_id: str, t: int) -> bytes:
        try:
            nonce = b64d(nonce_text, what="nonce", length=32)
        except FormatError as exc:
            raise Refused(400, "bad_request", str(exc)) from None
        row = conn.execute(select(schema.challenges).where(schema.challenges.c.nonce == nonce_text)).first()
        if row is None:
            raise Refused(
                403, "nonce_unknown", "the nonce was not issued by this key service (ask for a new challenge)"
            )
        if row.used_at is not None:
            raise Refused(409, "nonce_reused", "the nonce was already used: replayed release refused")
        spent = conn.execute(
            update(schema.challenges)
            .where(schema.challenges.c.nonce == nonce_text, schema.challenges.c.used_at.is_(None))
            .values(used_at=t)
        )
        if spent.rowcount != 1:
            raise Refused(409, "nonce_reused", "the nonce was already used: replayed release refused")
        if row.host != peer.spki or row.key_id != key_id:
            raise Refused(403, "nonce_mismatch", "the nonce was issued to another host or for another key")
        if row.expires_at < t:
            raise Refused(403, "nonce_expired", "the challenge expired; ask for a new one")
        return nonce


_AUDITED_RESULT_FIELDS = (
    "grant_id", "lease_id", "expires_at", "key_id", "version", "rewrapped", "revoked", "attested",
)  # fmt: skip


def _grant_json(row: Any) -> dict[str, Any]:
    keys = (
        "grant_id", "model", "identity", "not_before", "not_after", "max_hosts", "max_releases",
        "releases", "policy", "grace_s", "created_at",
    )  # fmt: skip
    out = {k: row[k] for k in keys}
    out["evidence"] = json.loads(row["evidence"])
    out["revoked_at"] = row.get("revoked_at")
    out["revoke_reason"] = row.get("revoke_reason")
    return out
