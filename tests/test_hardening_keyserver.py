"""Issue 14 on the key-service side: each attack run against a real key service process on loopback.

- grant impersonation: a certificate from the service's own CA whose URI SAN reads ``spki:<victim>``, or
  walks out of a ``/*`` prefix (``/prod/../host/a``, percent-encoded dots, empty segments...), gets
  nothing, and the audit names the attacker's real key hash;
- a flood of refused requests writes a bounded number of audit entries that still count every refusal;
- deep JSON is a 400 with its own code, never a 500; the process cannot dump core;
- port in use, unknown config keys, the lease key printed again, the admin-token variables in --help.

Certificates the fixed ``pki issue`` refuses to write are forged here with the service's CA key, as
another CA tool (or modelseal before the fix) would issue them.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import signal
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from modelseal.encoding import b64d, b64e
from modelseal.errors import ServiceError
from modelseal.keyserver import auditchain as audit
from modelseal.keyserver.sqlstore.store import open_store
from modelseal.pki import PeerIdentity, identity_of_cert_file
from modelseal.release import protocol

from .services import KeyServer, wait_for
from .test_cli import ms
from .test_keyserver import grant, key_of, sealed_model

# --- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KeyServer]:
    ks = KeyServer(tmp_path / "ks", None).start()
    try:
        yield ks
    finally:
        ks.stop()


def forged_cert(server: KeyServer, name: str, uris: list[str]) -> tuple[str, str]:
    """A client certificate signed by the service's CA carrying exactly ``uris`` as URI SANs."""
    pki_dir = server.dir / "pki"
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = server.dir / f"{name}.pem", server.dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def attempt(server: KeyServer, cert: tuple[str, str], key_id: str) -> tuple[int, str, bytes | None]:
    """Challenge and release as the holder of ``cert``: (status, code or "ok", the data key if released)."""
    with server.host_client(cert) as client:
        challenge = client.post("/v1/challenge", json={"key_id": key_id})
        if challenge.status_code != 200:
            return challenge.status_code, challenge.json()["error"]["code"], None
        eph = protocol.EphemeralKey()
        nonce = challenge.json()["nonce"]
        body = {"key_id": key_id, "nonce": nonce, "ephemeral_key": b64e(eph.public), "evidence": []}
        answer = client.post("/v1/release", json=body)
        if answer.status_code != 200:
            return answer.status_code, answer.json()["error"]["code"], None
        _, dek = eph.open_release(
            answer.json(), nonce=b64d(nonce), client_spki_hash=identity_of_cert_file(cert[0]).spki_hash,
            key_id=key_id, service_key=protocol.load_service_public_key(server.info["lease_public_key"]),
        )  # fmt: skip
        return 200, "ok", bytes(dek)


def audit_events(server: KeyServer) -> list[dict[str, Any]]:
    with server.admin() as admin:
        entries = admin.call("GET", "/v1/admin/audit", limit=10000)["entries"]
    assert audit.verify_entries(entries).ok
    return [json.loads(e["entry"]) for e in entries]


# --- item 1: grant impersonation -------------------------------------------------------------------


@pytest.mark.slow
def test_uri_san_spelled_like_a_key_hash_gets_nothing(server: KeyServer, tmp_path: Path) -> None:
    key_id = key_of(sealed_model(server, tmp_path))
    victim = server.host_cert("victim")
    victim_spki = identity_of_cert_file(victim[0]).spki
    grant(server, "demo", victim_spki)
    assert attempt(server, victim, key_id)[0] == 200  # the victim's own certificate still works

    spelled = [
        [victim_spki],  # the reported attack: URI SAN "spki:<victim hash>"
        ["SPKI:" + victim_spki.removeprefix("spki:")],
        [victim_spki + "/x"],
        ["spiffe://td/host/x", victim_spki],  # hidden behind a genuine URI
    ]
    attackers = []
    for n, uris in enumerate(spelled):
        cert = forged_cert(server, f"attacker-{n}", uris)
        attackers.append(identity_of_cert_file(cert[0]).spki)
        status, code, dek = attempt(server, cert, key_id)
        assert (status, code, dek) == (403, "bad_identity", None), uris
        with server.host_client(cert) as client:  # nor may it list the victim's keys
            assert client.get("/v1/keys").status_code == 403

    events = audit_events(server)
    refusals = [e for e in events if e.get("code") == "bad_identity"]
    assert {e["host"] for e in refusals} == set(attackers)  # the attacker's real key hash, never the victim's
    assert all(victim_spki not in (e["host"],) and "reissue" in e["why"] for e in refusals)
    released_to = {e["host"] for e in events if e["event"] == "release" and e["decision"] == "ok"}
    assert released_to == {victim_spki}


PREFIX_ESCAPES = [
    "spiffe://td/prod/../host/a",
    "spiffe://td/prod/%2e%2e/host/a",
    "spiffe://td/prod/.%2E/host/a",
    "spiffe://td/prod/%2E%2E%2Fhost%2Fa",
    "spiffe://td/prod/..;/host/a",
    "spiffe://td/prod/./a",
    "spiffe://td/prod//a",
    "spiffe://td/prod/",
    "spiffe://td/prod/a\x00/../../host/a",
    "spiffe://td/prod/a /../../host/a",
    "spiffe://td/prod\\..\\host\\a",
    "spiffe://td/prod/*",
    "spiffe://user@td/prod/a",
    "spiffe://td/prod/a?../../host/a",
    "spiffe://td/prod/a#/../../host/a",
]


@pytest.mark.slow
def test_prefix_grant_cannot_be_escaped(server: KeyServer, tmp_path: Path) -> None:
    key_id = key_of(sealed_model(server, tmp_path))
    grant(server, "demo", "spiffe://td/prod/*")

    for n, uri in enumerate(PREFIX_ESCAPES):
        status, code, dek = attempt(server, forged_cert(server, f"esc-{n}", [uri]), key_id)
        assert (status, code, dek) == (403, "bad_identity", None), uri
    for n, uri in enumerate(["spiffe://td/prod/a", "SPIFFE://TD/prod/b", "spiffe://td/prod/x/y"]):
        assert attempt(server, forged_cert(server, f"ok-{n}", [uri]), key_id)[0] == 200, uri
    for n, uri in enumerate(["spiffe://td/production/a", "spiffe://td/prod", "spiffe://other/prod/a"]):
        assert attempt(server, forged_cert(server, f"no-{n}", [uri]), key_id)[:2] == (403, "not_granted"), uri


BAD_GRANT_IDENTITIES = [
    "spki:abc",  # not a 32-byte hash
    "spki:" + b64e(bytes(31)),
    "spki:" + b64e(bytes(32)) + "=",
    "spiffe://td/prod/../host/*",
    "spiffe://td/prod/%2e%2e/*",
    "spiffe://td/prod//*",
    "spiffe://td/*/a",
    "spiffe://*",
    "spiffe://td/prod/a?x",
    "https://user@h/a",
    "host-a",  # no scheme: neither a key hash nor a URI
    "spiffe://td/a b",
    "spiffe://td/a\x00",
]


@pytest.mark.slow
def test_grant_api_refuses_identities_that_name_no_host(server: KeyServer) -> None:
    with server.admin() as admin:
        admin.call("POST", "/v1/admin/models", {"model": "m"})
        for identity in BAD_GRANT_IDENTITIES:
            with pytest.raises(ServiceError) as refused:
                admin.call("POST", "/v1/admin/grants", {"model": "m", "identity": identity})
            assert (refused.value.status, refused.value.code) == (400, "bad_identity"), identity
    canonical = grant(server, "m", "SPIFFE://TD/prod/*")["identity"]
    assert canonical == "spiffe://td/prod/*"
    spki = "spki:" + b64e(bytes(range(32)))
    assert grant(server, "m", "SPKI:" + spki[5:])["identity"] == spki
    refused = [e for e in audit_events(server) if e.get("code") == "bad_identity"]
    assert len(refused) == len(BAD_GRANT_IDENTITIES) and all(e["event"] == "grant.add" for e in refused)


@pytest.mark.slow
def test_pki_issue_refuses_uris_that_collide_with_identities(tmp_path: Path) -> None:
    ms("pki", "init", tmp_path / "ca")
    spki = identity_of_cert_file(tmp_path / "ca" / "ca.pem").spki
    for n, uri in enumerate([spki, "spiffe://td/prod/../host/a", "spiffe://td/prod/%2e%2e/a", "spiffe://td/a/"]):
        out = ms("pki", "issue", tmp_path / "ca", f"h{n}", "--uri", uri, check=False)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "cannot be a host identity" in out.stderr
        assert not (tmp_path / "ca" / f"h{n}.pem").exists() and not (tmp_path / "ca" / f"h{n}.key").exists()
    issued = json.loads(ms("pki", "issue", tmp_path / "ca", "good", "--uri", "SPIFFE://TD/Prod/a", "--json").stdout)
    assert issued["uris"] == ["spiffe://td/Prod/a"]  # scheme and host lowercased, the path kept


# --- the matcher on its own --------------------------------------------------------------------------


def _peer(digest: bytes, uris: tuple[str, ...] = ()) -> PeerIdentity:
    return PeerIdentity("spki:" + b64e(digest), digest, uris)


MATCHES = [
    ("spiffe://td/prod/*", "spiffe://td/prod/a", True),
    ("spiffe://td/prod/*", "spiffe://td/prod/a/b", True),
    ("spiffe://td/prod/*", "spiffe://td/prod", False),
    ("spiffe://td/prod/*", "spiffe://td/production/a", False),
    ("spiffe://td/prod/*", "spiffe://td2/prod/a", False),
    ("spiffe://td/*", "spiffe://td/a", True),
    ("spiffe://td/prod/a", "spiffe://td/prod/a", True),
    ("spiffe://td/prod/a", "spiffe://td/prod/A", False),
    ("SPIFFE://TD/prod/a", "spiffe://td/prod/a", True),
    ("https://h.example:8443/x/*", "https://h.example:8443/x/y", True),
    ("https://h.example/x/*", "https://h.example:8443/x/y", False),
    ("urn:example:hosts/*", "urn:example:hosts/a", True),
]


@pytest.mark.parametrize(("grant_text", "uri", "expected"), MATCHES)
def test_uri_grants_match_whole_canonical_segments(grant_text: str, uri: str, expected: bool) -> None:
    from modelseal.keyserver.identity import naming, parse_grant_identity
    from modelseal.pki import identity_uri

    peer = _peer(bytes(32), (identity_uri(uri),))
    assert parse_grant_identity(grant_text).matches(peer) is expected
    assert (parse_grant_identity(grant_text).text in naming(peer)) is expected  # what stores look grants up by


def test_spki_grant_matches_only_the_key_hash() -> None:
    from modelseal.keyserver.identity import parse_grant_identity

    victim, other = bytes(range(32)), bytes(32)
    grant_ = parse_grant_identity("spki:" + b64e(victim))
    assert grant_.matches(_peer(victim))
    # even a peer that somehow listed the victim's identity text as a URI is not the victim
    assert not grant_.matches(_peer(other, ("spki:" + b64e(victim),)))
    # and a URI grant never matches a key hash
    uri_grant = parse_grant_identity("spiffe://td/a")
    assert not uri_grant.matches(PeerIdentity("spiffe://td/a", bytes(32)))
    # a certificate with any refused URI SAN matches nothing, not even its own key hash
    refused = PeerIdentity("spki:" + b64e(victim), victim, ("spiffe://td/a",), refused_uris=("bad",))
    assert not grant_.matches(refused) and not uri_grant.matches(refused)


_URI_PIECES = st.sampled_from(
    ["/", ".", "..", "%2e", "%2E", "%2f", "%00", "a", "prod", "host", "A", ";", "\\", " ", "\x00", "//", "*", "?",
     "#", "@", ":", "é", "spki:", "~", "-", "_"]
)  # fmt: skip


def _resolved_path(uri: str) -> str:
    """What a lenient URI library would make of the path: percent-decoded, dot segments removed."""
    path = urllib.parse.urlsplit(urllib.parse.unquote(uri)).path
    return posixpath.normpath(path) if path else ""


@settings(max_examples=1000, deadline=None)
@given(tail=st.lists(_URI_PIECES, max_size=12).map("".join), scheme=st.sampled_from(["spiffe", "SPIFFE", "spki"]))
def test_canonical_uris_cannot_escape_a_prefix(tail: str, scheme: str) -> None:
    from modelseal.errors import UsageError
    from modelseal.keyserver.identity import parse_grant_identity
    from modelseal.pki import identity_uri

    candidate = f"{scheme}://td/prod{tail}"
    try:
        uri = identity_uri(candidate)
    except UsageError:
        return
    assert identity_uri(uri) == uri and uri.isascii() and not re.search(r"[%\s\x00*?#@\\]", uri)
    assert not uri.startswith("spki:")
    path = urllib.parse.urlsplit(uri).path
    if path:  # nothing left to resolve: no dot or empty segments
        assert posixpath.normpath(path) == path
    if parse_grant_identity("spiffe://td/prod/*").matches(_peer(bytes(32), (uri,))):
        assert _resolved_path(uri).startswith("/prod/")


@settings(max_examples=1000, deadline=None)
@given(
    text=st.one_of(st.text(max_size=60), st.lists(_URI_PIECES, max_size=10).map(lambda p: "spiffe://td" + "".join(p)))
)
def test_grant_identity_parsing_is_typed_and_idempotent(text: str) -> None:
    from modelseal.errors import UsageError
    from modelseal.keyserver.identity import parse_grant_identity

    try:
        parsed = parse_grant_identity(text)
    except UsageError:
        return
    assert parse_grant_identity(parsed.text) == parsed
    assert (parsed.kind == "spki") == parsed.text.startswith("spki:")


@settings(max_examples=1000, deadline=None)
@given(
    grant=st.lists(_URI_PIECES, max_size=8).map(lambda p: "spiffe://td" + "".join(p)),
    host=st.lists(_URI_PIECES, max_size=10).map(lambda p: "spiffe://td" + "".join(p)),
    prefix=st.booleans(),
)
def test_every_grant_that_matches_a_host_is_among_the_identities_that_name_it(
    grant: str, host: str, prefix: bool
) -> None:
    """Stores look grants up by :func:`naming` (an index), not by scanning: a grant that matches a host
    but is not named would silently deny it."""
    from modelseal.errors import UsageError
    from modelseal.keyserver.identity import naming, parse_grant_identity
    from modelseal.pki import identity_uri

    try:
        parsed = parse_grant_identity(grant.rstrip("/*") + "/*" if prefix else grant)
        peer = _peer(bytes(range(32)), (identity_uri(host),))
    except UsageError:
        return
    if parsed.matches(peer):
        assert parsed.text in naming(peer)
    assert parse_grant_identity(peer.spki).text in naming(peer)


# --- item 9: refusal floods, deep JSON, core dumps -----------------------------------------------------


def _refusals(events: list[dict[str, Any]], event: str, code: str) -> tuple[int, int]:
    """(audit entries, refusals they account for) for one kind of refusal."""
    rows = [e for e in events if e["event"] == event and e.get("code") == code]
    return len(rows), sum(int(e.get("count", 1)) for e in rows)


@pytest.mark.slow
def test_refusal_flood_is_counted_not_written_one_by_one(server: KeyServer) -> None:
    flood, wrong_tokens = 400, 60
    with server.host_client(None) as anon:
        for _ in range(flood):
            assert anon.post("/v1/challenge", json={"key_id": "k"}).status_code == 401
        for _ in range(wrong_tokens):
            assert anon.get("/v1/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for n in range(wrong_tokens):
            assert anon.get(f"/v1/admin/nowhere/{n}").status_code == 404
    events = audit_events(server)  # reading the log writes the counts first
    rows, counted = _refusals(events, "challenge", "no_client_cert")
    assert counted == flood and rows <= 6  # 5 in full, then one summary entry with the count
    summary = next(e for e in events if e.get("summary") and e["code"] == "no_client_cert")
    assert summary["remote"] == "127.0.0.1" and summary["count"] == flood - 5 and summary["first_ms"] > 0
    assert _refusals(events, "admin.auth", "unauthorised")[1] == wrong_tokens
    assert _refusals(events, "request", "not_found")[1] == wrong_tokens
    assert len(events) < 30


@pytest.mark.slow
def test_refusal_counts_are_written_every_interval_and_at_shutdown(tmp_path: Path) -> None:
    ks = KeyServer(tmp_path / "ks", None)
    ks.config.write_text(ks.config.read_text().replace("interval_s = 60", "interval_s = 1"))
    ks.start()

    def stored() -> tuple[int, int]:
        store = open_store(f"sqlite:///{ks.dir / 'keyserver.db'}", migrate=False)
        try:
            rows = [e.to_json() for e in store.audit_entries()]
        finally:
            store.close()
        assert audit.verify_entries(rows).ok
        return _refusals([json.loads(r["entry"]) for r in rows], "challenge", "no_client_cert")

    try:
        with ks.host_client(None) as anon:
            for _ in range(40):
                anon.post("/v1/challenge", json={"key_id": "k"})
        wait_for(lambda: stored()[1] == 40, 15, "the interval's summary in the database")
        with ks.host_client(None) as anon:
            for _ in range(40):
                anon.post("/v1/challenge", json={"key_id": "k"})
    finally:
        ks.stop(signal.SIGTERM)
    rows, counted = stored()
    assert counted == 80 and rows <= 12


@pytest.mark.slow
def test_deep_or_non_strict_json_is_a_400_with_a_code(server: KeyServer) -> None:
    cert = server.host_cert("host-a")
    deep = b"[" * 60_000  # under the 64 KiB body limit, far over Python's recursion limit
    nested = b'{"key_id": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001
    cases = {
        deep: "json_too_deep",
        nested: "json_too_deep",
        b'{"key_id": NaN}': "malformed_json",
        b'{"key_id": "a", "key_id": "b"}': "malformed_json",
        b'{"key_id": "\xff"}': "malformed_json",
    }
    headers = {"content-type": "application/json"}
    with server.host_client(cert) as host, server.host_client(None) as anon:
        for body, code in cases.items():
            for path in ("/v1/challenge", "/v1/release"):
                answer = host.post(path, content=body, headers=headers)
                assert answer.status_code == 400, (path, body[:20], answer.status_code, answer.text[:200])
                assert answer.json()["error"]["code"] == code
            admin = anon.post(
                "/v1/admin/grants", content=body, headers={**headers, "Authorization": f"Bearer {server.token}"}
            )
            assert (admin.status_code, admin.json()["error"]["code"]) == (400, code)
        assert host.post("/v1/challenge", content=b"[" * 70_000, headers=headers).status_code == 413
    assert server.healthy()
    assert "Traceback" not in server.log.read_text()


@pytest.mark.slow
def test_key_service_process_cannot_dump_core(server: KeyServer) -> None:
    assert server.proc is not None
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


# --- item 11: the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_port_in_use_is_one_line_naming_the_port(tmp_path: Path) -> None:
    ks = KeyServer(tmp_path / "ks", None)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ks.port))
        holder.listen()
        out = ms("keyserver", "run", "--config", ks.config, check=False)
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if "modelseal: error" in line]
    assert len(lines) == 1 and f"127.0.0.1:{ks.port}" in lines[0] and "already in use" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("[server]\n", '[server]\nlissten = "127.0.0.1:1"\n'), "'lissten' in [server]"),
        (("[leases]\n", "[leases]\nlease_ttl = 5\n"), "'lease_ttl' in [leases]"),
        (("[database]\n", "[databse]\n"), "unknown table [databse]"),
        (("[audit]\n", "[audit]\nbursts = 1\n"), "'bursts' in [audit]"),
        (("max_body_bytes = 65536", "max_body_bytes = 4294967296"), "max_body_bytes must be from 1024"),
    ],
)
def test_unknown_config_keys_are_errors_naming_key_and_file(tmp_path: Path, edit: tuple[str, str], named: str) -> None:
    ks = KeyServer(tmp_path / "ks", None)
    text = ks.config.read_text()
    assert edit[0] in text
    ks.config.write_text(text.replace(edit[0], edit[1], 1))
    out = ms("keyserver", "migrate", "--config", ks.config, check=False)
    assert out.returncode == 1 and named in out.stderr and str(ks.config) in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_lease_key_is_printed_again_and_help_names_the_token_variables(server: KeyServer) -> None:
    pinned = server.info["lease_public_key"]
    assert ms("keyserver", "lease-key", "--config", server.config).stdout.strip() == pinned
    assert (
        json.loads(ms("keyserver", "lease-key", "--config", server.config, "--json").stdout)["lease_public_key"]
        == pinned
    )
    online = ms("keyserver", "--url", server.url, "--ca", server.ca, "lease-key", "--json").stdout
    assert json.loads(online)["lease_public_key"] == pinned
    helptext = ms("keyserver", "--help").stdout
    assert "MODELSEAL_ADMIN_TOKEN" in helptext and "MODELSEAL_ADMIN_TOKEN_FILE" in helptext and "lease-key" in helptext


@pytest.mark.slow
def test_audit_export_with_a_deep_line_is_reported_broken_not_a_crash(tmp_path: Path) -> None:
    export = tmp_path / "audit.jsonl"
    export.write_text("[" * 100_000 + "\n")
    out = ms("keyserver", "audit", "verify", "--file", export, check=False)
    assert out.returncode == 1 and "audit log BROKEN" in out.stdout


# --- the bounded JSON reader ------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k'), inner, max_size=3),
    max_leaves=20,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@settings(max_examples=500, deadline=None)
@given(value=_JSON)
def test_json_depth_scan_is_exact_and_strings_do_not_count(value: Any) -> None:
    from modelseal.jsonlimits import json_depth, loads_bounded

    text = json.dumps(value)
    assert json_depth(text) == _depth(value)
    assert loads_bounded(text, max_bytes=1 << 20, max_depth=_depth(value), what="doc") == value


@settings(max_examples=150, deadline=None)
@given(value=_JSON, junk=st.text(alphabet='[]{}"\\ab', max_size=12))
def test_json_depth_small_and_large_scans_agree(value: Any, junk: str) -> None:
    """A header or request (up to 64 KiB) is scanned by dropping its strings; a larger body by the
    parity of its quotes (review L1: one regex match per string made a 62 MiB body of short strings
    cost 4.8x as much). Both must give the same depth, valid JSON or not (unterminated strings too)."""
    from modelseal.jsonlimits import _depth_of_large, _depth_of_small

    for text in (json.dumps(value), json.dumps(value) + junk, junk + json.dumps(value)):
        plain = text.encode("utf-8", "surrogatepass").replace(b"\\\\", b"").replace(b'\\"', b"")
        assert _depth_of_small(plain) == _depth_of_large(plain)


def test_bounded_reader_never_recurses_or_raises_anything_else() -> None:
    from modelseal.jsonlimits import JSONLimitError, loads_bounded

    cases = {
        "[" * 1_000_000: "too_deep",
        '{"a":' * 200_000: "too_deep",
        '"[[[[' + "[" * 5000: "malformed_json",  # brackets inside an unterminated string do not count
        "x" * 101: "too_large",
        '{"a": Infinity}': "malformed_json",
        '{"a": 1e999}': "malformed_json",  # overflows to inf: found by the attack run after the fix
        "[-1e400]": "malformed_json",
        b"\xc3\x28": "malformed_json",
        "1" * 5000: "malformed_json",  # over Python's integer digit limit
    }
    for doc, code in cases.items():
        with pytest.raises(JSONLimitError) as refused:
            loads_bounded(doc, max_bytes=100 if code == "too_large" else 1 << 21, max_depth=64, what="the doc")
        assert refused.value.code == code and "the doc" in str(refused.value)
