"""Shared pieces of the command line: fail-closed error handling, JSON or human output."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from modelseal.cli.helptext import Group
from modelseal.errors import ModelsealError, UsageError
from modelseal.load.remote import is_remote

F = TypeVar("F", bound=Callable[..., Any])
out = Console()


class OneLineErrors(Group):
    """The top-level group: click's usage errors (a bad option value, a missing argument, exclusive
    options) become one line on stderr and exit 1, like every other error, instead of click's
    multi-line usage text and exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        run: Any = super().main  # click types main() by overloads on a literal standalone_mode
        if not standalone_mode:
            return run(*args, standalone_mode=False, **kwargs)
        try:
            code = run(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("modelseal: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            click.echo(f"modelseal: error: {exc.format_message()}{hint}", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def fail_closed(fn: F) -> F:
    """Turn modelseal errors into a clean message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModelsealError as exc:
            click.echo(f"modelseal: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("modelseal: interrupted", err=True)
            sys.exit(130)
        except OSError as exc:  # an unreadable input or the like: still one line, naming the path
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"modelseal: error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def require_inputs(*paths: str | os.PathLike[str]) -> None:
    """One-line error (exit 1) for a missing input, instead of click's multi-line usage error (exit 2)."""
    for p in paths:
        if not os.path.lexists(p) and not is_remote(p):  # a URL is checked when it is read
            raise UsageError(f"{p} does not exist")


def emit(as_json: bool, data: Any, human: Callable[[], None] | list[str]) -> None:
    """Print ``data`` as JSON, or the human form: a list of lines or a function that prints."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif callable(human):
        human()
    else:
        for line in human:
            click.echo(line)


json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
