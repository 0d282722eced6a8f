"""Rich output for grids and stored results: the live grid display, and tables of rows.

The live display (on a terminal) shows cells done / failed / left, the ETA, the cell running now and the last
cell's figures; elsewhere (logs, CI, a cluster job) it prints one line per finished cell instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ablate.record import empty_record

STANDARD_KEYS = set(empty_record())


def _get(record: dict[str, Any] | None, *path: str) -> Any:
    for part in path:
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:,.1f}"


def _num(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value / scale:,.{digits}f}"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60:02d}:{seconds % 60:02d}")
    )


def figures(record: dict[str, Any]) -> str:
    """A cell's headline figures in a few words."""
    if record.get("error"):
        error = record["error"]
        return f"failed: {error.get('type')}: {_first_line(error.get('message'))}"
    parts = [f"{_num(record.get('visual_tokens'))} visual tokens"]
    ttft = _get(record, "latency_ms", "ttft")
    if ttft is not None:
        parts.insert(0, f"TTFT {_ms(ttft)} ms")
    flops = _get(record, "flops", "total")
    if flops is not None:
        parts.append(f"{flops / 1e9:,.1f} GFLOPs")
    return ", ".join(parts)


def _first_line(text: Any, width: int = 160) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


class GridDisplay:
    """Receives the runner's events (see `ablate.runner.run_grid`) and shows them on `console` (stderr)."""

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
        self.last = f"{label}: {figures(record)}"
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


def extra_columns(records: Iterable[dict[str, Any]]) -> list[str]:
    """Top-level numeric fields beyond the standard record (e.g. a plugin's `accuracy`), in first-seen order."""
    found: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in STANDARD_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                found.setdefault(key)
    return list(found)


def rows_table(rows: list, title: str, skipped: set[str] = frozenset(), show_key: bool = False) -> Table:
    """One line per stored row: its cell, status and figures (count-only and failed rows show '-')."""
    extras = extra_columns(row.record for row in rows)
    table = Table(title=escape(title), title_justify="left")
    columns = ["#"] + (["key"] if show_key else []) + ["cell", "status", "visual tok", "TTFT ms", "encoder ms"]
    columns += ["prefill ms", "GFLOPs", "params M", "peak MB", *extras, "error"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("cell", "status", "error", "key") else "right")
    for index, row in enumerate(rows, 1):
        record, error = row.record, row.record.get("error")
        status = "failed" if error else "ok"
        if row.key in skipped:
            status += " (stored)"
        cells = [str(index)] + ([row.key[:10]] if show_key else []) + [escape(row.label or record.get("name") or "-")]
        cells += [
            f"[red]{status}[/]" if error else status,
            _num(record.get("visual_tokens")),
            _ms(_get(record, "latency_ms", "ttft")),
            _ms(_get(record, "latency_ms", "encoder")),
            _ms(_get(record, "latency_ms", "prefill")),
            _num(_get(record, "flops", "total"), 1e9, 1),
            _num(_get(record, "params", "total"), 1e6, 1),
            _num(record.get("peak_memory_mb")),
            *[_num(record.get(key), digits=3) for key in extras],
            escape(f"{error.get('type')}: {_first_line(error.get('message'), 90)}") if isinstance(error, dict) else "",
        ]
        table.add_row(*cells)
    return table


# ------------------------------------------------------------------------------------------- `ablate results`


def results_command(args, out: Console, err: Console) -> int:
    import json
    import sys

    from ablate.store import Store

    with Store(args.db, create=False) as store:
        if args.grids:
            table = Table(title=f"grids in {args.db}", title_justify="left")
            for column in ("grid", "cells", "stored", "failed"):
                table.add_column(column)
            for grid_id in store.grid_ids():
                members = list(store.wandb_runs(grid_id))
                status = store.status(members)
                failed = sum(1 for value in status.values() if value == "failed")
                table.add_row(escape(grid_id), str(len(members)), str(len(status)), str(failed))
            out.print(table)
            return 0
        rows = store.rows(grid=args.grid, filters=args.overrides, status=args.status)
    if args.csv:
        if args.csv == "-":
            write_csv(rows, sys.stdout)
        else:
            with open(args.csv, "w", newline="") as handle:
                write_csv(rows, handle)
            err.print(f"wrote {len(rows)} rows to {args.csv}", highlight=False, markup=False)
    if args.jsonl:
        for row in rows:
            print(json.dumps(row.record))
    if not args.csv and not args.jsonl:
        where = f"grid {args.grid}" if args.grid else str(args.db)
        out.print(rows_table(rows, f"{where}: {len(rows)} rows", show_key=True))
    return 0


def write_csv(rows: list, handle) -> None:
    """One line per row: key, label, status, then every record field flattened with dots (lists as JSON)."""
    import csv
    import json

    from ablate.tracking import flatten

    flat = [
        {
            "key": row.key,
            "label": row.label,
            "status": "failed" if row.record.get("error") else "ok",
            **flatten(row.record),
        }
        for row in rows
    ]
    columns = list(dict.fromkeys(column for line in flat for column in line))
    writer = csv.DictWriter(handle, fieldnames=columns)
    writer.writeheader()
    for line in flat:
        writer.writerow(
            {key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in line.items()}
        )
