"""``modelseal keyserver usage ...``: what each licence used, per period, from the hosts' signed reports."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import click

from modelseal.cli.helptext import ADMIN_VARS, Group
from modelseal.cli.keyserver import _admin, _time
from modelseal.cli.kit import emit, fail_closed, json_option
from modelseal.errors import UsageError

COLUMNS = ("licence", "grant_id", "model", "period", "requests", "items", "input_tokens", "output_tokens", "tokens")


@click.group(cls=Group, reads=ADMIN_VARS)
def usage_group() -> None:
    """Usage per licence (grant) per period, from the hosts' signed usage reports; reset a host's chain."""


@usage_group.command("report", reads=ADMIN_VARS)
@click.option("--grant", "grant_id", help="Only this grant.")
@click.option("--model", help="Only this model's grants.")
@click.option("--since", help="From this time (ISO 8601; default: 31 days before --until).")
@click.option("--until", help="Up to this time, excluded (ISO 8601; default: now).")
@click.option("--period", default="day", show_default=True, help="Buckets: hour, day, week or seconds.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout (one row per licence and period).")
@json_option
@click.pass_context
@fail_closed
def usage_report(ctx: click.Context, as_csv: bool, as_json: bool, **opts: Any) -> None:
    """Per-licence totals per period: requests, inference items, input and output tokens.

    Counts come from the usage reports hosts' agents send with each lease renewal, as the key service
    accepted them (each entry signed by the host's agent and chained; see docs/licensing.md).
    """
    if as_csv and as_json:
        raise UsageError("give --csv or --json, not both")
    query = {"since": _time(opts["since"]), "until": _time(opts["until"]), "period": opts["period"],
             "grant": opts["grant_id"], "model": opts["model"]}  # fmt: skip
    with _admin(ctx) as admin:
        result = admin.usage(**query)
    rows = [{**row, "period": _iso(row["period_start"])} for row in result["usage"]]
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    lines = [
        f"{row['licence'] or '-'}\t{row['grant_id']}\t{row['model']}\t{row['period']}\trequests {row['requests']}"
        f"\titems {row['items']}\ttokens {row['input_tokens']} in / {row['output_tokens']} out"
        for row in rows
    ]
    emit(as_json, result, lines or [f"no usage reported from {_iso(result['since'])} to {_iso(result['until'])}"])


@usage_group.command("reset", reads=ADMIN_VARS)
@click.argument("host")
@click.option("--log", "log_id", help="Only this usage log of the host (the id in its first entry and the agent's "
              "error); default: all of them.")  # fmt: skip
@click.option("--reason", default="", help="Why (kept in the audit log).")
@json_option
@click.pass_context
@fail_closed
def usage_reset(ctx: click.Context, host: str, log_id: str | None, reason: str, as_json: bool) -> None:
    """Forget where HOST's (spki:...) usage log stands, after it was damaged or restored from a backup: it
    may then be reported again from its start. Entries already counted are not counted again; usage that
    only a lost log held is gone."""
    with _admin(ctx) as admin:
        result = admin.reset_usage(host, log_id, reason)
    emit(as_json, result, [f"{result['reset']} usage log(s) of {host} reset: they may be reported again"])


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
