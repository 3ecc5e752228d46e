"""The two help sections every command shares: the files it writes and the environment variables it reads.

A script author or an operator reading ``--help`` should not have to read the source to learn that
``verify`` consults ``$MODELSEAL_IDENTITY`` or that ``pki issue`` leaves a 0600 key beside the
certificate. Each command declares both where it is defined (``reads=``, ``writes=``); the help shows
them after the options, as "Writes:" and "Environment:" lists in the options' own layout. One table
describes each variable, so it reads the same under every command; tests/test_cli_help.py holds the
contract of which command reads which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

# Every variable a command may read, with what it holds. A command may word one differently where its
# meaning there is narrower (``reads=[("VAR", "...")]``).
ENVIRONMENT: dict[str, str] = {
    "MODELSEAL_IDENTITY": "Identity when no -i is given, in any form -i takes (a key file, identity text, "
    "env:VAR, agent:SOCKET).",
    "MODELSEAL_AGENT_SOCKET": "Else, the host agent's socket: keys come from the agent (as -i agent:SOCKET).",
    "MODELSEAL_THREADS": "Threads that encrypt or decrypt segments (default: the usable CPU cores).",
    "MODELSEAL_HUGEPAGES": "1: decrypt a model's tensors into one arena advised to use huge pages.",
    "MODELSEAL_PREFAULT": "0: do not pre-fault tensor memory before decrypting into it.",
    "MODELSEAL_KEYSERVER_URL": "The key service's URL, when `keyserver --url` is not given.",
    "MODELSEAL_KEYSERVER_CA": "CA certificate the key service's TLS certificate must chain to, when "
    "`keyserver --ca` is not given.",
    "MODELSEAL_ADMIN_TOKEN": "The key service's admin token (the text `keyserver init` wrote to DIR/admin.token).",
    "MODELSEAL_ADMIN_TOKEN_FILE": "Else, the file holding the admin token (DIR/admin.token, mode 0600).",
    "BAO_TOKEN": "Token for an OpenBao/Vault transit master key.",
    "TPM2TOOLS_TCTI": "The TPM, when --tcti is not given.",
    "MODELSEAL_REMOTE_CONCURRENCY": "Range requests in flight per remote model file (default 16; docs/remote.md).",
    "MODELSEAL_REMOTE_PART_SIZE": "Bytes per range request of a remote model file (default 16M).",
    "MODELSEAL_REMOTE_RETRIES": "Retries of a range after a transient network failure (default 4).",
    "MODELSEAL_REMOTE_TIMEOUT": "Seconds a remote read may wait for the server (default 60).",
    "MODELSEAL_HTTP_BEARER_TOKEN": "Bearer token for https:// model URLs (never sent over http://).",
    "MODELSEAL_HTTP_TOKEN_FILE": "Else, the file holding that token.",
    "MODELSEAL_HTTP_TOKEN_HOSTS": "Hosts (host or host:port, comma-separated) the bearer token is sent to; "
    "required with a token.",
    "MODELSEAL_HTTP_CLIENT_CERT": "PEM client certificate for mTLS to https:// model URLs.",
    "MODELSEAL_HTTP_CLIENT_KEY": "Its PEM private key.",
    "MODELSEAL_HTTP_CA_BUNDLE": "PEM CAs to trust for https:// model URLs instead of the system's.",
    "VAR": "A variable named on the command line (--passphrase-env VAR, -i env:VAR): a passphrase or identity text.",
}
# Read only by Python APIs that no command runs (the LLM loaders: docs/llm.md), so no --help lists them.
LIBRARY_ENVIRONMENT: dict[str, str] = {
    "MODELSEAL_MEMDIR": "The RAM filesystem (tmpfs) for the decrypted configuration files of an LLM directory "
    "(default /dev/shm).",
}

# Shared by every command that takes an identity (-i, else the environment).
IDENTITY_VARS = ("MODELSEAL_IDENTITY", "MODELSEAL_AGENT_SOCKET")
# Read by every admin command: where the key service is, how to check it, the admin token.
ADMIN_VARS = (
    "MODELSEAL_KEYSERVER_URL",
    "MODELSEAL_KEYSERVER_CA",
    "MODELSEAL_ADMIN_TOKEN",
    "MODELSEAL_ADMIN_TOKEN_FILE",
)

# Read where a model file is a URL (a serve pointer file, docs/remote.md); AWS_* come from boto3's own chain.
REMOTE_VARS = (
    "MODELSEAL_REMOTE_CONCURRENCY",
    "MODELSEAL_REMOTE_PART_SIZE",
    "MODELSEAL_REMOTE_RETRIES",
    "MODELSEAL_REMOTE_TIMEOUT",
    "MODELSEAL_HTTP_BEARER_TOKEN",
    "MODELSEAL_HTTP_TOKEN_FILE",
    "MODELSEAL_HTTP_TOKEN_HOSTS",
    "MODELSEAL_HTTP_CLIENT_CERT",
    "MODELSEAL_HTTP_CLIENT_KEY",
    "MODELSEAL_HTTP_CA_BUNDLE",
)

Reads = Sequence[str | tuple[str, str]]
Writes = Sequence[tuple[str, str]]


def environment_rows(reads: Reads) -> list[tuple[str, str]]:
    """``reads`` as (variable, meaning) rows, each name checked against :data:`ENVIRONMENT`."""
    rows = []
    for item in reads:
        name, meaning = (item, None) if isinstance(item, str) else item
        if name not in ENVIRONMENT:
            raise ValueError(f"{name} is not in modelseal.cli.helptext.ENVIRONMENT: describe it there first")
        rows.append((name, meaning or ENVIRONMENT[name]))
    return rows


def format_sections(formatter: click.HelpFormatter, writes: Writes, environment: list[tuple[str, str]]) -> None:
    """The "Writes:" and "Environment:" lists, after the options (and a group's commands)."""
    for title, rows in (("Writes", list(writes)), ("Environment", environment)):
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class _Sections:
    """What :class:`Command` and :class:`Group` add to click's classes: ``reads=`` and ``writes=``, shown
    after the options (and a group's commands) by :func:`format_sections`."""

    def __init__(self, *args: Any, reads: Reads = (), writes: Writes = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environment = environment_rows(reads)
        self.writes = list(writes)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        format_sections(formatter, self.writes, self.environment)


class Command(_Sections, click.Command):
    """A command whose help lists what it writes (``writes=``) and which variables it reads (``reads=``)."""


class Group(_Sections, click.Group):
    """A group with the same help sections; its commands and subgroups are of these classes too."""

    command_class = Command
    group_class = type  # subgroups: this class
