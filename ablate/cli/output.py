"""Where the CLI's output goes: results to stdout (with --json, exactly one JSON object), everything for people to
stderr, both through rich."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

# Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


def progress_bar(*columns, transient: bool = True) -> Progress:
    """A progress bar on stderr: a description, the bar, done/total, the elapsed time, then `columns`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        *columns,
        console=err,
        transient=transient,
    )
