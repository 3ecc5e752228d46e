"""The key service's decisions, independent of HTTP and of storage: registration, grants, challenges, releases.

Each public method that changes state runs in one :meth:`~modelseal.keyserver.store.Store.transaction`,
which locks the audit head first, so a decision, its side effects (nonce spent, release counted, host
recorded, lease stored) and its audit record commit together or not at all. A refusal is a
:class:`Refused` carrying the HTTP status and a stable code; it is audited and committed (a spent
nonce stays spent) before it propagates. Past a burst, refusals are counted instead of written one
by one (:mod:`modelseal.keyserver.refusals`), so a flood cannot fill the disk. Evidence is checked by
the verifiers the service was built with, one per kind (:mod:`modelseal.attest`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from modelseal.attest import Claims, EvidenceError, VerificationContext, Verifier
from modelseal.attest.base import unmet
from modelseal.crypto.keys import wipe
from modelseal.encoding import b64d, b64e
from modelseal.errors import FormatError, ModelsealError
from modelseal.keyserver.challenges import ChallengeTokens
from modelseal.keyserver.identity import identity_matches, naming, parse_grant_identity
from modelseal.keyserver.masterkey import MasterKey
from modelseal.keyserver.policy import Policy, PolicyError
from modelseal.keyserver.refusals import RefusalLimiter, RefusalSettings
from modelseal.keyserver.store import (
    ChallengeRecord,
    GrantRecord,
    KeyRecord,
    LeaseRecord,
    ModelRecord,
    Store,
    Transaction,
)
from modelseal.keyserver.usage import ReportRejected, UsageState, accept_report, check_metered, policy_usage
from modelseal.pki import PeerIdentity
from modelseal.release.protocol import MODEL_NAME, Lease, binding, now, seal_release
from modelseal.release.terms import Terms

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


@dataclass(frozen=True)
class NonceCheck:
    """What a release's nonce is, found once before its transaction: ``malformed`` (why it is not 32 bytes
    of base64url), ``expires`` (None: not issued here), ``bound`` (issued to this host for this key)."""

    malformed: str | None
    expires: int | None
    bound: bool


def _new_id(prefix: str) -> str:
    return f"{prefix}_{b64e(os.urandom(12))}"


MAX_EVIDENCE = 8
PURGE_MARGIN_S = 3600  # spent nonces are kept this long past their expiry


def verify_presented(
    evidence: list[dict[str, Any]], ctx: VerificationContext, verifiers: Mapping[str, Verifier]
) -> dict[str, Claims | str]:
    """Verify each piece of presented evidence once: claims by kind, or why that kind was rejected."""
    if len(evidence) > MAX_EVIDENCE:
        raise Refused(400, "bad_request", f"at most {MAX_EVIDENCE} pieces of evidence per release")
    results: dict[str, Claims | str] = {}
    # mtls comes from the TLS handshake itself, whether or not the host lists it
    for piece in [{"kind": "mtls"}, *(p for p in evidence if p.get("kind") != "mtls")]:
        kind = str(piece.get("kind"))
        verifier = verifiers.get(kind)
        if kind in results:
            raise Refused(400, "bad_request", f"{kind} evidence presented twice")
        if verifier is None:
            results[kind] = f"no verifier for {kind} evidence is installed (known: {', '.join(sorted(verifiers))})"
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
    """Every decision the key service makes, on a :class:`~modelseal.keyserver.store.Store`.

    ``verifiers`` maps each evidence kind this service accepts to its verifier (built from the
    ``[attestation]`` table by :func:`modelseal.keyserver.server.build_service`); ``clock`` gives the
    Unix time every decision is taken at."""

    def __init__(
        self,
        store: Store,
        master: MasterKey,
        signer: ed25519.Ed25519PrivateKey,
        settings: ServiceSettings,
        verifiers: Mapping[str, Verifier],
        refusals: RefusalSettings | None = None,
        clock: Callable[[], int] = now,
    ) -> None:
        self.store, self.master, self.signer, self.settings = store, master, signer, settings
        self.verifiers = dict(verifiers)
        self.clock = clock
        self.refusals = RefusalLimiter(refusals)
        self.tokens = ChallengeTokens(signer)
        self._spent = 0

    @property
    def evidence_kinds(self) -> list[str]:
        """The evidence kinds this service can verify (``GET /v1/info``)."""
        return sorted(self.verifiers)

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()

    # --- transactions --------------------------------------------------------------------------

    def _decide(self, event: dict[str, Any], body: Callable[[Transaction], T], audit_success: bool = True) -> T:
        """Run ``body`` in a transaction and audit the outcome; refusals are audited and committed too."""
        with self.store.transaction() as tx:
            try:
                result = body(tx)
            except Refused as refusal:
                record = {**event, "decision": "refused", "code": refusal.code, "why": str(refusal)}
                if self.refusals.admit(record):  # else counted; side effects (a spent nonce) commit anyway
                    tx.append_audit(record)
                saved = refusal
            else:
                if not audit_success:
                    return result
                extra = result if isinstance(result, dict) else {}
                public = {k: v for k, v in extra.items() if k in _AUDITED_RESULT_FIELDS}
                tx.append_audit({**event, "decision": "ok", **public})
                return result
        raise saved

    def audit_refusal(self, event: dict[str, Any], status: int, code: str, message: str) -> Refused:
        """Record a request refused before it reached a decision (malformed, unauthenticated...)."""
        record = {**event, "decision": "refused", "code": code, "why": message}
        if self.refusals.admit(record):
            with self.store.transaction() as tx:
                tx.append_audit(record)
        return Refused(status, code, message)

    def flush_refusals(self) -> int:
        """Append one summary entry per refusal count past the burst; return how many were written."""
        summaries = self.refusals.drain()
        if not summaries:
            return 0
        try:
            with self.store.transaction() as tx:
                for summary in summaries:
                    tx.append_audit(summary)
        except BaseException:
            self.refusals.requeue(summaries)
            raise
        return len(summaries)

    # --- admin -----------------------------------------------------------------------------------

    def add_model(self, name: str, description: str, actor: dict[str, Any]) -> dict[str, Any]:
        if not MODEL_NAME.fullmatch(name):
            raise Refused(400, "bad_request", f"model name {name[:80]!r} must match {MODEL_NAME.pattern}")

        def body(tx: Transaction) -> dict[str, Any]:
            if tx.has_model(name):
                raise Refused(409, "exists", f"model {name} is already registered")
            tx.add_model(ModelRecord(name, description, self.clock()))
            return {"model": name, "description": description}

        return self._decide({"event": "model.add", "model": name, **actor}, body)

    def list_models(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.store.models()]

    def register_key(self, model: str, dek: bytes, actor: dict[str, Any]) -> dict[str, Any]:
        if len(dek) != 32:
            raise Refused(400, "bad_request", "a data key must be 32 bytes")
        key_id = _new_id("k")

        def body(tx: Transaction) -> dict[str, Any]:
            self._model(tx, model)
            wrapped, version = self.master.wrap(dek, key_id)
            tx.add_key(KeyRecord(key_id, model, wrapped, version, self.clock()))
            return {"key_id": key_id, "model": model}

        return self._decide({"event": "key.register", "model": model, **actor}, body)

    def _requirement(self, req: dict[str, Any]) -> dict[str, Any]:
        verifier = self.verifiers.get(req["kind"])
        if verifier is None:
            raise Refused(400, "bad_request", f"unknown evidence kind {req['kind']!r} (known: {self.evidence_kinds})")
        try:
            return verifier.check_requirement(req)
        except EvidenceError as exc:
            raise Refused(400, "bad_request", str(exc)) from None

    def add_grant(self, model: str, spec: dict[str, Any], actor: dict[str, Any]) -> dict[str, Any]:
        """Grant ``spec["identity"]`` access to ``model``'s keys (other fields validated by the HTTP layer).

        The identity is stored in canonical form (:mod:`modelseal.keyserver.identity`); one that names
        no host (a URI spelled like a key hash, dot segments, ...) is refused and audited."""
        spec = {**spec, "evidence": [self._requirement(req) for req in spec["evidence"]]}
        try:
            terms = Terms.from_json(spec.get("terms"))
        except FormatError as exc:
            raise Refused(400, "bad_request", str(exc)) from None
        if spec.get("policy"):
            try:
                Policy(spec["policy"])
            except PolicyError as exc:
                raise Refused(400, "bad_policy", str(exc)) from None
        grant_id = _new_id("g")

        def body(tx: Transaction) -> dict[str, Any]:
            try:
                identity = parse_grant_identity(spec["identity"]).text
            except ModelsealError as exc:
                raise Refused(400, "bad_identity", str(exc)) from None
            self._model(tx, model)
            grant = GrantRecord(
                grant_id=grant_id,
                model=model,
                identity=identity,
                not_before=spec.get("not_before"),
                not_after=spec.get("not_after"),
                max_hosts=spec.get("max_hosts"),
                max_releases=spec.get("max_releases"),
                releases=0,
                policy=spec.get("policy"),
                grace_s=spec.get("grace_s", self.settings.default_grace_s),
                created_at=self.clock(),
                evidence=spec["evidence"],
                terms=terms.to_json(),
            )
            tx.add_grant(grant)
            return _grant_json(grant)

        return self._decide({"event": "grant.add", "model": model, "identity": spec["identity"], **actor}, body)

    def list_grants(self, model: str | None = None) -> list[dict[str, Any]]:
        return [{**_grant_json(use.grant), "hosts": use.hosts} for use in self.store.grants(model)]

    def revoke_grant(self, grant_id: str, reason: str, actor: dict[str, Any]) -> dict[str, Any]:
        def body(tx: Transaction) -> dict[str, Any]:
            grant = tx.grant(grant_id)
            if grant is None:
                raise Refused(404, "unknown_grant", f"no grant {grant_id}")
            if grant.revoked_at is None:
                tx.revoke_grant(grant_id, self.clock(), reason)
            return {"grant_id": grant_id, "model": grant.model, "revoked": True}

        return self._decide({"event": "grant.revoke", "grant_id": grant_id, "reason": reason, **actor}, body)

    def rotate_master_key(self, actor: dict[str, Any]) -> dict[str, Any]:
        """New master-key version, every stored key re-wrapped under it in one transaction."""
        version = self.master.rotate()

        def body(tx: Transaction) -> dict[str, Any]:
            keys = tx.keys()
            for key in keys:
                blob, new = self.master.rewrap(key.wrapped, key.wrap_version, key.key_id)
                tx.rewrap_key(key.key_id, blob, new)
            return {"version": version, "rewrapped": len(keys)}

        result = self._decide({"event": "master_key.rotate", **actor}, body)
        self.master.retire_old()
        return result

    def usage_report(
        self, since: int, until: int, period_s: int, grant_id: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """Usage per grant (licence) per period, from the accepted reports."""
        licences = {use.grant.grant_id: use.grant.terms.get("licence") for use in self.store.grants(model)}
        return [
            {"grant_id": row.grant_id, "licence": licences.get(row.grant_id), "model": row.model,
             "period_start": row.period_start, "period_s": period_s, **row.usage.to_json(), "tokens": row.usage.tokens}
            for row in self.store.usage_totals(since, until, period_s, grant_id, model)
        ]  # fmt: skip

    def reset_usage(self, host: str, log: str | None, reason: str, actor: dict[str, Any]) -> dict[str, Any]:
        """Forget the head of ``host``'s usage log ``log`` (every log of the host: None), so that the log may
        be reported again from its start (entries already counted are not counted again). For a log that
        was damaged or restored from a backup."""

        def body(tx: Transaction) -> dict[str, Any]:
            reset = tx.reset_usage_head(host, log)
            if not reset:
                which = f"log {log[:64]} of host" if log else "host"
                raise Refused(404, "unknown_host", f"{which} {host[:100]} has sent no usage report")
            return {"host": host, "log": log, "reset": reset}

        event = {"event": "usage.reset", "host": host, "log": log, "reason": reason, **actor}
        return self._decide(event, body)

    def audit_log(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Audit entries after ``after``; refusal counts not yet written are written first."""
        self.flush_refusals()
        return [e.to_json() for e in self.store.audit_entries(after, limit)]

    # --- hosts -----------------------------------------------------------------------------------

    def granted_keys(self, peer: PeerIdentity) -> list[dict[str, Any]]:
        """Key ids of every model some live grant gives this host (what an agent may prefetch)."""
        t = self.clock()
        models = sorted(
            {
                g.model
                for g in self.store.live_grants(naming(peer))
                if identity_matches(g.identity, peer) and (g.not_after is None or g.not_after > t)
            }
        )
        return [{"key_id": k, "model": m} for k, m in self.store.keys_of(models)]

    def challenge(
        self, peer: PeerIdentity, key_id: str, actor: dict[str, Any], usage_log: str | None = None
    ) -> dict[str, Any]:
        """A fresh nonce for ``peer`` and ``key_id``, and the evidence kinds its grants want: one read and
        no write (:class:`ChallengeTokens`), so challenges do not queue on the audit head across replicas."""
        found = self.store.key_grants(key_id, naming(peer))
        if found is None:
            event = {"event": "challenge", "key_id": key_id, "host": peer.spki, **actor}
            raise self.audit_refusal(event, 404, "unknown_key", f"no key {key_id} is registered with this key service")
        _, grants = found
        expires = self.clock() + self.settings.challenge_ttl_s
        kinds = {req["kind"] for g in grants if identity_matches(g.identity, peer) for req in g.evidence}
        nonce = self.tokens.issue(peer.spki, key_id, expires)
        usage_seq = self.store.usage_seq(peer.spki, usage_log) if usage_log else 0  # report after it (usage.py)
        return {"nonce": b64e(nonce), "expires_at": expires, "evidence": sorted(kinds), "usage_seq": usage_seq}

    def release(
        self,
        peer: PeerIdentity,
        key_id: str,
        nonce_text: str,
        ephemeral_public: bytes,
        evidence: list[dict[str, Any]],
        actor: dict[str, Any],
        usage: Any = None,
    ) -> dict[str, Any]:
        """Decide one release (steps in docs/key-release.md) and build the signed, wrapped answer.

        ``usage`` is the host agent's usage report, if it sent one (:mod:`modelseal.keyserver.usage`).

        The evidence is verified first, outside the transaction (signature and certificate checks take
        milliseconds and must not hold the audit-head lock); the nonce it is bound to is spent inside."""
        early: Refused | None = None
        malformed = None
        try:
            nonce_bytes = b64d(nonce_text, what="nonce", length=32)
        except FormatError as exc:
            nonce_bytes, malformed = b"", str(exc)  # refused (and audited) when the transaction spends it
        ctx = VerificationContext(
            peer, binding(nonce_bytes, peer.spki_hash, ephemeral_public), nonce_bytes, self.clock()
        )
        expires = self.tokens.issued(nonce_bytes)
        bound = expires is not None and self.tokens.bound(nonce_bytes, peer.spki, key_id)
        token = NonceCheck(malformed, expires, bound)
        fresh = token.bound and expires is not None and expires >= ctx.now
        verified: dict[str, Claims | str] = {}
        if fresh:  # evidence for a nonce the transaction will refuse is not worth a millisecond of verification
            try:
                verified = verify_presented(evidence, ctx, self.verifiers)
            except Refused as refusal:
                early = refusal

        def body(tx: Transaction) -> dict[str, Any]:
            key = self._key(tx, key_id)
            self._spend_nonce(tx, nonce_text, token, peer, key_id, self.clock())
            if early is not None:
                raise early
            try:
                state = accept_report(tx, peer, usage, nonce_bytes, ctx.now)
            except ReportRejected as exc:
                raise Refused(403, "usage_rejected", f"the usage report is refused: {exc}") from None
            candidates = self._grants_for(tx, key.model, peer, include_revoked=True)
            if not candidates:
                raise Refused(403, "not_granted", f"host {peer.spki} holds no grant for model {key.model}")
            refusals = []
            for grant in candidates:
                try:
                    return self._grant_release(tx, grant, key, peer, ctx, ephemeral_public, verified, state)
                except Refused as refusal:
                    refusals.append(refusal)
            raise refusals[0]

        event = {"event": "release", "key_id": key_id, "host": peer.spki, **actor}
        return self._decide(event, body)

    def _grant_release(
        self,
        tx: Transaction,
        grant: GrantRecord,
        key: KeyRecord,
        peer: PeerIdentity,
        ctx: VerificationContext,
        ephemeral_public: bytes,
        verified: dict[str, Claims | str],
        usage: UsageState,
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
        hosts = tx.grant_hosts(gid)
        new_host = peer.spki not in hosts
        if new_host and grant.max_hosts is not None and len(hosts) >= grant.max_hosts:
            raise Refused(403, "host_limit", f"grant {gid} is already used by its maximum of {grant.max_hosts} hosts")
        claims = check_requirements(grant.evidence, verified)
        terms = Terms.from_json(grant.terms)
        lease_usage: dict[str, Any] = {}
        if terms.metered:
            used = tx.usage_of(gid, terms.period_start(t))
            problem = check_metered(grant, terms, usage, used, t)
            if problem:
                code, message = problem.split(": ", 1)
                raise Refused(403, code, message)
            seq = usage.head.seq if usage.head is not None else 0
            lease_usage = {"period_start": terms.period_start(t), "used": used.capped().to_json(), "seq": seq}
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
                "usage": policy_usage(tx, gid, terms, t),
                "now": t,
            }
            try:
                allowed = Policy(grant.policy).allows(variables)
            except PolicyError as exc:
                raise Refused(403, "policy_error", f"grant {gid} policy failed to evaluate: {exc}") from None
            if not allowed:
                raise Refused(403, "policy_denied", f"grant {gid} policy denies this release")
        dek = self.master.unwrap(key.wrapped, key.wrap_version, key.key_id)
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
                terms=grant.terms,
                usage=lease_usage,
            )
            answer = seal_release(dek, lease, ephemeral_public, self.signer)
        finally:
            wipe(dek)
        tx.record_release(LeaseRecord(lease.lease_id, gid, key.key_id, peer.spki, t, expires), new_host)
        # what was attested, for the audit trail: the measurements each verifier proved (mtls: the host key)
        attested = {kind: c["measurements"] for kind, c in claims.items() if kind != "mtls"}
        return {**answer, "grant_id": gid, "lease_id": lease.lease_id, "expires_at": expires, "attested": attested}

    # --- lookups ---------------------------------------------------------------------------------

    @staticmethod
    def _model(tx: Transaction, model: str) -> None:
        if not tx.has_model(model):
            raise Refused(
                404, "unknown_model", f"model {model} is not registered: `modelseal keyserver model add {model}` first"
            )

    @staticmethod
    def _key(tx: Transaction, key_id: str) -> KeyRecord:
        key = tx.key(key_id)
        if key is None:
            raise Refused(404, "unknown_key", f"no key {key_id} is registered with this key service")
        return key

    @staticmethod
    def _grants_for(
        tx: Transaction, model: str, peer: PeerIdentity, include_revoked: bool = False
    ) -> list[GrantRecord]:
        named = tx.grants_for_model(model, include_revoked, naming(peer))
        return [g for g in named if identity_matches(g.identity, peer)]

    def _spend_nonce(
        self, tx: Transaction, nonce_text: str, token: NonceCheck, peer: PeerIdentity, key_id: str, t: int
    ) -> None:
        """Refuse a nonce this service did not issue, to this host for this key, or that has expired (as
        ``token`` found, before the transaction), and spend it: record it in this (head-locked) transaction,
        so a second use finds it. A refused use spends it too."""
        if token.malformed is not None:
            raise Refused(400, "bad_request", token.malformed)
        if token.expires is None:
            raise Refused(
                403, "nonce_unknown", "the nonce was not issued by this key service (ask for a new challenge)"
            )
        if tx.challenge(nonce_text) is not None:
            raise Refused(409, "nonce_reused", "the nonce was already used: replayed release refused")
        self._spent += 1
        if self._spent % 64 == 1:  # now and then, forget spent nonces long expired (a margin for replicas'
            tx.purge_challenges(t - PURGE_MARGIN_S)  # clocks: one running ahead must not free a fresh nonce)
        tx.add_challenge(ChallengeRecord(nonce_text, peer.spki, key_id, token.expires, used_at=t))
        if not token.bound:
            raise Refused(403, "nonce_mismatch", "the nonce was issued to another host or for another key")
        if token.expires < t:
            raise Refused(403, "nonce_expired", "the challenge expired; ask for a new one")


_AUDITED_RESULT_FIELDS = (
    "grant_id", "lease_id", "expires_at", "key_id", "version", "rewrapped", "revoked", "attested",
)  # fmt: skip


def _grant_json(grant: GrantRecord) -> dict[str, Any]:
    """A grant as the admin API answers it."""
    return asdict(grant)
