"""``modelseal agent ...``: run the host agent, ask it for its status."""

from __future__ import annotations

import datetime as dt
import json
import logging

import click

from modelseal.cli.helptext import Group
from modelseal.cli.kit import emit, fail_closed, json_option


@click.group(cls=Group)
def agent() -> None:
    """The host agent: fetches granted keys, keeps them in memory only, serves local loaders."""


@agent.command(
    "run",
    writes=[("the config's socket", "The unix socket loaders and `serve` ask for keys (its mode from the config).")],
)
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True),
    help="The agent's TOML config (key service URL, TLS files, socket, evidence); see docs/operations.md.",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too (never key material).")
@fail_closed
def agent_run(config_path: str, verbose: bool) -> None:
    """Serve keys on the configured unix socket until SIGINT/SIGTERM (keys are wiped on exit)."""
    from modelseal.agent.config import AgentConfig
    from modelseal.agent.daemon import run

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = AgentConfig.load(config_path)
    for warning in cfg.warnings():
        logging.getLogger("modelseal.agent").warning("%s", warning)
    run(
        cfg.client(),
        cfg.socket,
        cfg.acl,
        mode=cfg.socket_mode,
        prefetch=cfg.prefetch,
        max_grace_s=cfg.max_grace_s,
        retry_s=cfg.retry_s,
        limits=cfg.limits,
        usage_log=cfg.open_usage_log(),
    )


@agent.command("status", reads=[("MODELSEAL_AGENT_SOCKET", "The agent's socket, when --socket is not given.")])
@click.option("--socket", "socket_path", required=True, envvar="MODELSEAL_AGENT_SOCKET", help="Agent socket.")
@json_option
@fail_closed
def agent_status(socket_path: str, as_json: bool) -> None:
    """Keys the agent holds (never their bytes), their lease expiry, and keys it dropped and why."""
    from modelseal.release.wire import ask

    answer, _ = ask(socket_path, {"op": "status"})
    answer.pop("ok", None)

    def when(t: int) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")

    lines = [f"{k['model']}\t{k['key_id']}\tlease until {when(k['expires_at'])}" for k in answer["keys"]]
    lines += [f"dropped {key_id}: {d['code']} ({d['message']})" for key_id, d in answer["dropped"].items()]
    emit(as_json, answer, lines or ["no keys held"])


@agent.command(
    "tpm-enroll",
    reads=["TPM2TOOLS_TCTI"],
    writes=[("the TPM", "The attestation key, persisted at --handle (no file is written).")],
)
@click.option("--tcti", required=True, envvar="TPM2TOOLS_TCTI", help="TPM: device:/dev/tpmrm0, swtpm:port=2321...")
@click.option("--handle", default="0x81010002", show_default=True, help="Persistent handle for the AK.")
@click.option("--pcrs", default="sha256:0,1,2,3,4,5,6,7", show_default=True, help="PCRs the quotes will cover.")
@click.option("--replace", is_flag=True, help="Replace an AK already persisted at --handle.")
@json_option
@fail_closed
def agent_tpm_enroll(tcti: str, handle: str, pcrs: str, replace: bool, as_json: bool) -> None:
    """Create and persist this host's TPM attestation key; print the grant requirement that pins it.

    Give the printed requirement to the model owner (`keyserver grant add --evidence '...'`); put the same
    tcti, handle and pcrs in the agent's [tpm] table and add "tpm" to its evidence list.
    """
    from modelseal.attest.tpm_tools import enroll

    result = enroll(tcti, handle, pcrs, replace)
    verb = "created and persisted" if result["created"] else "already persisted"
    emit(
        as_json,
        result,
        [
            f"attestation key {verb} at {handle}",
            f"AK name: {result['ak_name']}",
            "grant requirement (pins the AK and today's PCR values):",
            json.dumps(result["requirement"]),
        ],
    )
