"""``modelseal keyserver ...``: run the key service and administer it.

Admin commands talk to the running service's admin API: ``--url`` (or ``$MODELSEAL_KEYSERVER_URL``),
``--ca`` (or ``$MODELSEAL_KEYSERVER_CA``) and a token in ``$MODELSEAL_ADMIN_TOKEN`` or
``$MODELSEAL_ADMIN_TOKEN_FILE``. ``lease-key`` prints the lease-signing public key agents pin.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import click

from modelseal import atomicfile, pki
from modelseal.cli import logs
from modelseal.cli.helptext import ADMIN_VARS, Group
from modelseal.cli.kit import emit, fail_closed, json_option
from modelseal.errors import FormatError, UsageError
from modelseal.jsonlimits import loads_bounded
from modelseal.release.terms import Terms, period_seconds

URL_ENV = "MODELSEAL_KEYSERVER_URL"


def _admin(ctx: click.Context) -> Any:
    from modelseal.release.client import AdminClient

    url, ca = ctx.obj["url"], ctx.obj["ca"]
    if not url:
        raise UsageError(f"no key-service URL: pass --url or set {URL_ENV}")
    return AdminClient(url, ca=ca)


def _time(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{value!r} is not an ISO 8601 time (e.g. 2027-01-31T00:00:00Z)") from None
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp())


# --- keyserver: local ------------------------------------------------------------------------------------


@click.group(cls=Group, reads=ADMIN_VARS)
@click.option("--url", envvar=URL_ENV, help=f"Key-service URL for admin commands [env {URL_ENV}].")
@click.option(
    "--ca", envvar="MODELSEAL_KEYSERVER_CA", help="CA certificate of the key service [env MODELSEAL_KEYSERVER_CA]."
)
@click.pass_context
def keyserver(ctx: click.Context, url: str | None, ca: str | None) -> None:
    """Run the key service (init, run, migrate, lease-key) and administer it (model, grant, usage,
    master-key, audit).

    Admin commands (model, grant, usage, master-key, audit) need the service's URL (--url or
    MODELSEAL_KEYSERVER_URL), its CA (--ca or MODELSEAL_KEYSERVER_CA) and the admin token that init
    wrote: its text in MODELSEAL_ADMIN_TOKEN, or its file in MODELSEAL_ADMIN_TOKEN_FILE. Agents must pin
    the lease-signing public key: `modelseal keyserver lease-key --config keyserver.toml` prints it.
    """
    ctx.obj = {"url": url, "ca": ca}


@keyserver.command(
    "init",
    reads=[("BAO_TOKEN", "With --transit-url: the transit token (or the variable --transit-token-env names).")],
    writes=[
        ("DIRECTORY/keyserver.toml", "The config `keyserver run --config` takes."),
        ("DIRECTORY/pki/", "ca.pem, the CA clients check the service against; ca.key and keyserver.key, mode 0600; "
         "keyserver.pem, the server certificate (--server-name)."),
        ("DIRECTORY/master.key", "The local master key, mode 0600 (not with --transit-url)."),
        ("DIRECTORY/lease-signing.key", "The key that signs leases, mode 0600."),
        ("DIRECTORY/admin.token", "The admin token, mode 0600 (admin commands: MODELSEAL_ADMIN_TOKEN_FILE)."),
        ("DIRECTORY/keyserver.db", "The SQLite database (not with --db)."),
    ],
)  # fmt: skip
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--db", "database", help="Database URL (default: SQLite in DIRECTORY). postgresql://... for replicas.")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to serve on.")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="Names for the server certificate (default localhost, 127.0.0.1).",
)
@click.option("--transit-url", help="Keep the master key in OpenBao/Vault transit at this URL instead of a local file.")
@click.option("--transit-token-env", default="BAO_TOKEN", show_default=True, help="Variable holding the transit token.")
@click.option(
    "--renew-after", "renew_after", type=int, default=60, show_default=True, metavar="SECONDS",
    help="How often agents renew leases: a revocation reaches hosts within this ([leases] renew_after_s).",
)  # fmt: skip
@json_option
@fail_closed
def ks_init(
    directory: str,
    database: str | None,
    listen: str,
    server_names: tuple[str, ...],
    transit_url: str | None,
    transit_token_env: str,
    renew_after: int,
    as_json: bool,
) -> None:
    """Create a key-service state directory: config, CA and server certificate, master key, admin token.

    Prints the service's URL with a name its certificate covers: the listen address if a --server-name
    names it, else the first --server-name.
    """
    from modelseal.keyserver.config import KeyServerConfig, init_state
    from modelseal.keyserver.server import public_url
    from modelseal.keyserver.store import open_store

    if database is not None:  # an unreachable database stops init before it writes a file (it used to
        open_store(database, migrate=True).close()  # leave a half-made directory a second init refused)
    transit = {"url": transit_url, "token_env": transit_token_env} if transit_url else None
    result = init_state(directory, database=database, listen=listen, server_names=list(server_names),
                        transit=transit, renew_after_s=renew_after)  # fmt: skip
    cfg = KeyServerConfig.load(result["config"])
    store = open_store(cfg.database, migrate=True)
    result["schema"] = store.schema_revision()
    store.close()
    result["url"] = public_url(cfg)
    emit(
        as_json,
        result,
        [
            f"config:            {result['config']}",
            f"CA for clients:    {result['ca']}",
            f"service URL:       {result['url']} (what --url and keyserver: recipients take)",
            f"admin token file:  {result['admin_token_file']} (0600; set MODELSEAL_ADMIN_TOKEN_FILE to it)",
            f"lease signing key: {result['lease_public_key']} (pin it in agent configs; "
            f"`modelseal keyserver lease-key --config {result['config']}` prints it again)",
            f"next: modelseal keyserver run --config {result['config']}",
        ],
    )


config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The keyserver.toml that `keyserver init` wrote.",
)


@keyserver.command(
    "run",
    reads=[("BAO_TOKEN", "With a transit master key: its token (or the variable the config's token_env names).")],
    writes=[
        ("the config's database", "Models, wrapped keys, grants, leases and the audit log (SQLite: keyserver.db)."),
        ("master.key", "New versions on `master-key rotate` (local master key, mode 0600)."),
    ],
)
@config_option
@click.option("--no-migrate", is_flag=True, help="Refuse to start on an old schema instead of migrating it.")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True,
    help="Processes accepting on the one port (use PostgreSQL for more than one).",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@fail_closed
def ks_run(config_path: str, no_migrate: bool, workers: int, verbose: bool) -> None:
    """Serve the key service (HTTPS, TLS 1.3) until SIGINT/SIGTERM.

    Logs the URL clients use (with a name the certificate covers). The admin API accepts the admin token
    `init` made (the config keeps only its hash); admin commands send it from MODELSEAL_ADMIN_TOKEN or
    MODELSEAL_ADMIN_TOKEN_FILE.
    """
    from modelseal.keyserver.config import KeyServerConfig
    from modelseal.keyserver.server import run

    logs.configure(verbose)
    run(KeyServerConfig.load(config_path), migrate=not no_migrate, workers=workers)


@keyserver.command("migrate", writes=[("the config's database", "Its schema, upgraded in place.")])
@config_option
@json_option
@fail_closed
def ks_migrate(config_path: str, as_json: bool) -> None:
    """Upgrade the database schema to this version (Alembic). Back up first."""
    from modelseal.keyserver.config import KeyServerConfig
    from modelseal.keyserver.store import open_store

    store = open_store(KeyServerConfig.load(config_path).database, migrate=True)
    revision = store.schema_revision()
    store.close()
    emit(as_json, {"revision": revision}, [f"schema at revision {revision}"])


@keyserver.command("lease-key", reads=["MODELSEAL_KEYSERVER_URL", "MODELSEAL_KEYSERVER_CA"])
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    help="Read it from this key service's config (else ask the service at --url, checked against --ca).",
)
@json_option
@click.pass_context
@fail_closed
def ks_lease_key(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Print the lease-signing public key to pin as lease_public_key in every agent.toml."""
    if config_path:
        from modelseal.keyserver.config import KeyServerConfig

        key, source = KeyServerConfig.load(config_path).lease_public_key(), config_path
    else:
        from modelseal.release.client import service_info

        url = ctx.obj["url"]
        if not url:
            raise UsageError(f"give --config keyserver.toml, or the service's --url (or {URL_ENV})")
        key, source = str(service_info(url, ctx.obj["ca"]).get("lease_public_key")), url
    emit(as_json, {"lease_public_key": key, "source": source}, [key])


# --- keyserver: admin API ------------------------------------------------------------------------------


@keyserver.group("model", reads=ADMIN_VARS)
def model_group() -> None:
    """Register and list models."""


@model_group.command("add", reads=ADMIN_VARS)
@click.argument("name")
@click.option("--description", default="", help="Free text shown in listings.")
@json_option
@click.pass_context
@fail_closed
def model_add(ctx: click.Context, name: str, description: str, as_json: bool) -> None:
    """Register model NAME (then seal with -r keyserver:URL#NAME)."""
    with _admin(ctx) as admin:
        result = admin.add_model(name, description)
    emit(as_json, result, [f"registered model {name}"])


@model_group.command("list", reads=ADMIN_VARS)
@json_option
@click.pass_context
@fail_closed
def model_list(ctx: click.Context, as_json: bool) -> None:
    """List models and how many keys each has."""
    with _admin(ctx) as admin:
        models = admin.models()
    emit(as_json, models, [f"{m['name']}\t{m['keys']} key(s)\t{m['description']}" for m in models])


@keyserver.group("grant", reads=ADMIN_VARS)
def grant_group() -> None:
    """Grant hosts access to a model's keys, list and revoke grants."""


@grant_group.command("add", reads=ADMIN_VARS)
@click.argument("model")
@click.argument("identity", required=False)
@click.option("--cert", type=click.Path(dir_okay=False, exists=True), help="Grant the host holding this certificate.")
@click.option("--not-before", help="Start of validity (ISO 8601).")
@click.option("--not-after", help="End of validity (ISO 8601).")
@click.option("--days", type=int, help="Validity from now, in days (instead of --not-after).")
@click.option("--max-hosts", type=int, help="How many distinct hosts may use this grant (for URI patterns).")
@click.option("--max-releases", type=int, help="Licence: total key releases allowed.")
@click.option("--grace", "grace_s", type=int, help="Seconds a host may keep serving when the key service is down.")
@click.option("--policy", help="CEL expression over identity, licence, usage, claims, now (docs/key-release.md).")
@click.option("--metered", is_flag=True, help="Count usage: hosts must send signed usage reports (docs/licensing.md).")
@click.option("--max-requests", type=int, help="Licence: requests per period (implies --metered).")
@click.option("--max-items", type=int, help="Licence: inference items (batch rows) per period (implies --metered).")
@click.option("--max-tokens", type=int, help="Licence: LLM input + output tokens per period (implies --metered).")
@click.option("--period", default="day", show_default=True, help="Quota period: hour, day, week or seconds (>= 10).")
@click.option("--rate", type=float, help="Licence: requests per second per client identity, enforced by the server.")
@click.option("--report-grace", "report_grace_s", type=int, help="Seconds a metered host may renew without a usage "
              "report (default 3600).")  # fmt: skip
@click.option("--licence", help="The licence id (the one a fingerprinted copy carries: `seal --fingerprint`).")
@click.option(
    "--evidence",
    "evidence",
    multiple=True,
    help="Required evidence: a kind (sev-snp) or a JSON requirement (docs/attestation.md); repeatable.",
)
@json_option
@click.pass_context
@fail_closed
def grant_add(ctx: click.Context, model: str, identity: str | None, cert: str | None, **opts: Any) -> None:
    """Grant IDENTITY (spki:..., a URI SAN, or a spiffe://.../* prefix) access to MODEL's keys."""
    as_json = opts.pop("as_json")
    if bool(identity) == bool(cert):
        raise UsageError("give exactly one of IDENTITY or --cert")
    who = pki.identity_of_cert_file(cert).spki if cert else identity
    body: dict[str, Any] = {"model": model, "identity": who}
    not_after = _time(opts["not_after"])
    if opts["days"] is not None:
        not_after = int(dt.datetime.now(dt.UTC).timestamp()) + opts["days"] * 86400
    for name, value in (("not_before", _time(opts["not_before"])), ("not_after", not_after)):
        if value is not None:
            body[name] = value
    for name in ("max_hosts", "max_releases", "grace_s", "policy"):
        if opts[name] is not None:
            body[name] = opts[name]
    body["evidence"] = [_requirement(e) for e in opts["evidence"]]
    body["terms"] = _terms(opts)
    with _admin(ctx) as admin:
        grant = admin.add_grant(body)
    emit(as_json, grant, [f"grant {grant['grant_id']}: {who} may use {model}"])


def _terms(opts: dict[str, Any]) -> dict[str, Any]:
    """The licence terms of ``grant add``'s options, checked here so a typo fails before the request."""
    try:
        terms: dict[str, Any] = {"period_s": period_seconds(opts["period"])}
        if opts["metered"]:
            terms["metered"] = True
        for name in ("max_requests", "max_items", "max_tokens", "rate", "report_grace_s", "licence"):
            if opts[name] is not None:
                terms[name] = opts[name]
        return Terms.from_json(terms, "the licence terms").to_json()
    except FormatError as exc:
        raise UsageError(str(exc).replace("the licence terms.", "--").replace("_", "-")) from None


def _requirement(text: str) -> dict[str, Any]:
    """``--evidence KIND`` or ``--evidence '{"kind": ...}'``."""
    if not text.lstrip().startswith("{"):
        return {"kind": text}
    requirement = loads_bounded(text, max_bytes=16 * 1024, max_depth=8, what="the --evidence requirement")
    if not isinstance(requirement, dict):
        raise UsageError('--evidence takes a kind (sev-snp) or a JSON object ({"kind": ...})')
    return requirement


@grant_group.command("list", reads=ADMIN_VARS)
@click.option("--model", help="Only this model's grants.")
@json_option
@click.pass_context
@fail_closed
def grant_list(ctx: click.Context, model: str | None, as_json: bool) -> None:
    """List grants with their use (releases, hosts) and state."""
    with _admin(ctx) as admin:
        grants = admin.grants(model)
    emit(
        as_json,
        grants,
        [
            f"{g['grant_id']}\t{g['model']}\t{g['identity']}\treleases {g['releases']}\thosts {g['hosts']}\t"
            + ("REVOKED" if g["revoked_at"] else "active")
            for g in grants
        ],
    )


@grant_group.command("revoke", reads=ADMIN_VARS)
@click.argument("grant_id")
@click.option(
    "--reason",
    default="revoked by the model owner",
    show_default=True,
    help="Why: kept in the audit log and told to hosts that ask again.",
)
@json_option
@click.pass_context
@fail_closed
def grant_revoke(ctx: click.Context, grant_id: str, reason: str, as_json: bool) -> None:
    """Revoke GRANT_ID: its hosts drop the key at their next renewal."""
    with _admin(ctx) as admin:
        result = admin.revoke_grant(grant_id, reason)
    emit(as_json, result, [f"grant {grant_id} revoked"])


@keyserver.group("master-key", reads=ADMIN_VARS)
def master_key_group() -> None:
    """Rotate the master key that wraps every stored model key."""


@master_key_group.command("rotate", reads=ADMIN_VARS)
@json_option
@click.pass_context
@fail_closed
def master_rotate(ctx: click.Context, as_json: bool) -> None:
    """New master-key version; every stored key is re-wrapped (sealed files are not touched)."""
    with _admin(ctx) as admin:
        result = admin.rotate_master_key()
    emit(as_json, result, [f"master key now {result['version']}; {result['rewrapped']} key(s) re-wrapped"])


@keyserver.group("audit", reads=ADMIN_VARS)
def audit_group() -> None:
    """Export and verify the hash-chained audit log."""


def _fetch_audit(ctx: click.Context, after: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with _admin(ctx) as admin:
        while True:
            page = admin.audit_page(after, 1000)
            rows += page
            if len(page) < 1000:
                return rows
            after = int(page[-1]["seq"])


@audit_group.command(
    "export",
    reads=ADMIN_VARS,
    writes=[("OUTPUT", "The entries as JSON Lines, replacing the file (default: stdout).")],
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="JSON Lines file (default stdout; the summary then goes to stderr).",
)
@click.option("--after", type=int, default=0, help="Only entries after this sequence number.")
@json_option
@click.pass_context
@fail_closed
def audit_export(ctx: click.Context, output: str, after: int, as_json: bool) -> None:
    """Export audit entries as JSON Lines; print how many and the head SEQ:HASH.

    Keep the head with the export: `audit verify --head SEQ:HASH` later proves the log still holds every
    entry up to it (a log cut short fails).
    """
    if as_json and output == "-":
        raise UsageError("--json needs -o FILE (stdout carries the entries)")
    rows = _fetch_audit(ctx, after)
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    if output == "-":
        click.echo(text, nl=False)
    else:
        atomicfile.write_bytes(output, text.encode(), atomicfile.default_mode(), overwrite=True)
    head = f"{rows[-1]['seq']}:{rows[-1]['hash']}" if rows else None
    where = "stdout" if output == "-" else output
    summary = (
        f"exported {len(rows)} entries to {where}; head {head} (keep it for `audit verify --head`)"
        if head
        else f"exported 0 entries to {where} (none after {after})"
    )
    if as_json:
        emit(True, {"file": output, "entries": len(rows), "after": after, "head": head}, [])
    else:
        click.echo(summary, err=output == "-")


@audit_group.command("verify", reads=ADMIN_VARS)
@click.option("--file", "path", type=click.File("r"), help="Verify an exported JSON Lines file.")
@click.option("--db", "database", help="Verify straight from the database (URL).")
@click.option("--head", help="SEQ:HASH from an earlier export: also detects a log cut short.")
@json_option
@click.pass_context
@fail_closed
def audit_verify(ctx: click.Context, path: Any, database: str | None, head: str | None, as_json: bool) -> None:
    """Check every link of the audit chain (default: fetched through the admin API). Exit 1 if broken."""
    from modelseal.keyserver import auditchain as audit

    if path is not None:
        rows = list(audit.read_jsonl(path))
    elif database:
        from modelseal.keyserver.store import open_store

        store = open_store(database, migrate=False)
        try:
            rows = [entry.to_json() for entry in store.audit_entries()]
            recorded = store.audit_head()
        finally:
            store.close()
    else:
        rows = _fetch_audit(ctx)
    expected = None
    if head:
        seq, _, digest = head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise UsageError("--head must be SEQ:HASH (64 hex digits)")
        expected = (int(seq), digest)
    report = audit.verify_entries(rows, expected)
    if database and path is None:
        report = audit.against_recorded_head(report, recorded)
    emit(
        as_json,
        report.__dict__,
        [f"audit log OK: {report.count} entries, head {report.head_seq}:{report.head_hash}"]
        if report.ok
        else [f"audit log BROKEN: {report.problem}"],
    )
    if not report.ok:
        sys.exit(1)


# `keyserver usage ...` lives in its own module; registered here, after `_admin` exists
from modelseal.cli.usage import usage_group  # noqa: E402

keyserver.add_command(usage_group, "usage")
