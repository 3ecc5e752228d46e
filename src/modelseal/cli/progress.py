"""Progress bars (rich, on stderr) for long operations; silent when asked or when not on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn


@contextmanager
def byte_progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(nbytes)`` callback that drives a transfer-style bar (thread safe)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda n: None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total or None)  # 0: unknown (a URL), an open-ended bar
        yield lambda n: bar.advance(task, n)
