"""The live display of a running grid (on a terminal): cells done / failed / left, the ETA, the cell running now and
the last cell's figures; elsewhere (logs, CI, a cluster job) one line per finished cell instead."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ablate.report.tables import headline


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class GridDisplay:
    """Receives the runner's events (see `ablate.grid.runner.run_grid`) and shows them on `console` (stderr)."""

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        self.done = self.failed = self.lost_count = 0
        self.total = 0
        self.current = ""
        self.stage = ""
        self.last = ""

    def begin(self, grid, todo: int, skipped: int, launcher: str, workers: int) -> None:
        self.grid, self.total, self.start = grid, todo, time.perf_counter()
        where = f"{launcher}" + (f", {workers} workers" if workers > 1 else "")
        self.console.print(
            f"grid [bold]{escape(grid.id)}[/]: {len(grid.cells)} cells, {skipped} already in the store, {todo} to run ({where})",
            highlight=False,
        )
        if self.console.is_terminal and todo:
            self.live = Live(get_renderable=self._render, console=self.console, transient=True, refresh_per_second=4)
            self.live.start()

    def _render(self):
        finished = self.done + self.failed + self.lost_count
        left = self.total - finished
        elapsed = time.perf_counter() - self.start
        eta = elapsed / finished * left if finished else None
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=max(self.total, 1), completed=finished, width=30),
            Text(
                f"{finished}/{self.total}  ok {self.done}  failed {self.failed + self.lost_count}  left {left}  "
                f"ETA {_clock(eta)}  elapsed {_clock(elapsed)}"
            ),
        )
        lines = [head]
        if self.current:
            lines.append(
                Text(f"now:  {self.current}" + (f"  ({self.stage})" if self.stage else ""), overflow="ellipsis")
            )
        if self.last:
            lines.append(Text(f"last: {self.last}", overflow="ellipsis"))
        return Group(*lines)

    def started(self, task: dict[str, Any]) -> None:
        self.current, self.stage = task["label"], ""

    def progress(self, what: str, done: int, total: int) -> None:
        self.stage = f"{what} {done}/{total}" if total > 1 else what

    def finished(self, result: dict[str, Any]) -> None:
        record = result["record"]
        label = next((cell.label for cell in self.grid.cells if cell.key == result["key"]), result["key"][:10])
        if record.get("error"):
            self.failed += 1
        else:
            self.done += 1
        self.last = f"{label}: {headline(record)}"
        if self.live is None:
            finished = self.done + self.failed + self.lost_count
            self.console.print(f"[{finished}/{self.total}] {self.last}", highlight=False, markup=False)

    def lost(self, task: dict[str, Any], why: str) -> None:
        self.lost_count += 1
        self.last = f"{task['label']}: not stored: {why}"
        if self.live is None:
            self.console.print(self.last, highlight=False, markup=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
