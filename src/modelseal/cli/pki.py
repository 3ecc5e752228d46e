"""``modelseal pki ...``: a small CA for a first deployment.

It issues the key service's server certificate and the hosts' client certificates, and prints the identity
a grant names. It is the owner's tool, beside the key service rather than inside its command group: the
same certificates serve ``modelseal serve --tls-cert`` and the client applications.
"""

from __future__ import annotations

import click

from modelseal import pki
from modelseal.cli.helptext import Group
from modelseal.cli.kit import emit, fail_closed, json_option


@click.group(cls=Group)
def pki_group() -> None:
    """A small CA for a first deployment: key-service server and host client certificates."""


@pki_group.command(
    "init",
    writes=[
        ("DIRECTORY/ca.pem", "The CA certificate (clients and the key service trust it)."),
        ("DIRECTORY/ca.key", "The CA's key, mode 0600 (keep it offline)."),
    ],
)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="modelseal CA", show_default=True, help="CA common name.")
@click.option("--force", is_flag=True, help="Overwrite an existing CA key.")
@json_option
@fail_closed
def pki_init(directory: str, name: str, force: bool, as_json: bool) -> None:
    """Create ca.pem and ca.key (0600) in DIRECTORY."""
    cert = pki.init_ca(directory, name, force=force)
    emit(as_json, {"ca": str(cert)}, [f"CA certificate: {cert} (keep {pki.CA_KEY} offline)"])


@pki_group.command(
    "issue",
    writes=[
        ("DIRECTORY/NAME.pem", "The certificate, signed by the CA in DIRECTORY."),
        ("DIRECTORY/NAME.key", "Its key, mode 0600 (not with --csr: the key stays with the requester)."),
    ],
)
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.argument("name")
@click.option(
    "--server-name", "server_names", multiple=True,
    help="DNS name or IP the server is reached at (repeatable): makes a server certificate.",
)  # fmt: skip
@click.option(
    "--uri",
    "uris",
    multiple=True,
    help="URI SAN for a host certificate, e.g. spiffe://example.org/host/a (canonical: no spki:, dot or "
    "empty segments, %-escapes, query or fragment).",
)
@click.option("--days", default=825, show_default=True, help="Validity in days.")
@click.option(
    "--csr", type=click.Path(dir_okay=False, exists=True),
    help="Certify the key in this signing request (`pki request` on the host) instead of making one here; "
    "its names are ignored: --server-name and --uri decide.",
)  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@json_option
@fail_closed
def pki_issue(
    directory: str,
    name: str,
    server_names: tuple[str, ...],
    uris: tuple[str, ...],
    days: int,
    csr: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Issue NAME.pem (and NAME.key, unless --csr) signed by the CA in DIRECTORY; print the identity a grant
    names."""
    if csr is None:
        cert, key = pki.issue(directory, name, server_names=list(server_names), uris=list(uris), days=days,
                              force=force)  # fmt: skip
    else:
        cert = pki.sign_request(directory, name, csr, server_names=list(server_names), uris=list(uris), days=days,
                                force=force)  # fmt: skip
        key = None
    ident = pki.identity_of_cert_file(cert)
    emit(
        as_json,
        {"cert": str(cert), "key": str(key) if key else None, "identity": ident.spki, "uris": list(ident.uris)},
        [
            f"certificate: {cert}",
            *([f"key:         {key}"] if key else []),
            f"identity:    {ident.spki}",
            *(f"uri:         {u}" for u in ident.uris),
        ],
    )


@pki_group.command(
    "request",
    writes=[
        ("DIRECTORY/NAME.key", "A new private key, mode 0600: it never leaves this machine."),
        ("DIRECTORY/NAME.csr", "The signing request to hand to the CA's owner (`pki issue --csr`)."),
    ],
)
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@json_option
@fail_closed
def pki_request(directory: str, name: str, force: bool, as_json: bool) -> None:
    """On the host: make NAME.key (0600) and a signing request NAME.csr for the owner's CA, so the host's
    key never leaves the host."""
    csr, key = pki.request(directory, name, force=force)
    emit(
        as_json,
        {"csr": str(csr), "key": str(key)},
        [f"key:     {key} (0600; stays here)", f"request: {csr} (give it to the CA's owner: pki issue --csr)"],
    )


@pki_group.command("identity")
@click.argument("cert", type=click.Path(dir_okay=False, exists=True))
@json_option
@fail_closed
def pki_identity(cert: str, as_json: bool) -> None:
    """Print the identities a grant can name for the host holding CERT."""
    ident = pki.identity_of_cert_file(cert)
    emit(
        as_json,
        {"identity": ident.spki, "uris": list(ident.uris), "refused_uris": list(ident.refused_uris)},
        [
            *ident.names(),
            *(f"refused: {why} (the key service serves this certificate nothing)" for why in ident.refused_uris),
        ],
    )
