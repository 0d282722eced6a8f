"""`ablate grid` (run a grid into a results store), `ablate results` (read the store) and `ablate plot`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ablate.api.errors import ConfigError, first_line
from ablate.cli.flags import MEASURE_FLAGS, parent, run_options
from ablate.cli.output import err, out, progress_bar
from ablate.measurement.record import value_at


def add_commands(sub) -> None:
    grid = sub.add_parser(
        "grid",
        parents=[parent("db", "json", "debug", "wandb", *MEASURE_FLAGS)],
        help="run a grid of configs into a results store (sweeps: key=a,b,c)",
    )
    grid.add_argument("config", help="a grid (`ablate list grids`) or grid file, or any config to sweep from")
    grid.add_argument("overrides", nargs="*", help="key=a,b,c sweeps a key; key=value sets it in every cell")
    grid.add_argument(
        "--dry-run",
        action="store_true",
        help="build every cell on the meta device: its tokens, params, FLOPs or the error it would fail with; run none",
    )
    grid.add_argument("--rerun", action="store_true", help="measure every cell again, even those the store holds")
    grid.add_argument("--retry-failed", action="store_true", help="measure again the cells stored as failed")
    grid.add_argument("--launcher", default="local", help="local (default), submitit (SLURM) or ray")
    grid.add_argument("--workers", type=int, default=1, help="cells at once: local worker processes, Ray CPUs, jobs")
    grid.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit executor parameter")
    grid.add_argument("--name", help="the grid's name (default: the grid file's name or the config's)")
    grid.set_defaults(handler=cmd_grid)

    results = sub.add_parser(
        "results",
        parents=[parent("db", "debug")],
        help="show stored results (filters: encoder=clip* 'visual_tokens<=256' ...; --sort, --columns, --pivot)",
        description="PATH: a dotted path into the record (latency_ms.ttft, visual_tokens, accuracy.exact_match), or "
        "encoder/reducer/connector/decoder for the config's components (encoder = config.encoder.name, "
        "encoder.image_size); key, label and status name a row.",
    )
    results.add_argument(
        "overrides",
        nargs="*",
        metavar="FILTER",
        help="PATH=VALUE (or != < <= > >=) on the record; a text VALUE with * ? [...] is a pattern (encoder=clip*)",
    )
    results.add_argument("--sort", metavar="PATH,...", help="order the rows by these paths (missing values last)")
    results.add_argument("--desc", action="store_true", help="with --sort: largest first")
    results.add_argument(
        "--columns",
        metavar="PATH,...",
        help="show these columns (a block such as latency_ms: each of its fields; `reducers`: a token-reduction "
        "paper's table); also for --csv and --json",
    )
    results.add_argument(
        "--pivot",
        metavar="ROWS,COLUMNS,VALUE",
        help="a table of VALUE with a line per value of ROWS and a column per value of COLUMNS, e.g. "
        "encoder,encoder.image_size,latency_ms.ttft (ROWS may join paths with +: encoder+reducer)",
    )
    results.add_argument("--grid", help="only this grid's cells, in grid order (ids: see `ablate results --grids`)")
    results.add_argument("--grids", action="store_true", help="list the grids in the store")
    results.add_argument("--status", choices=("ok", "failed"), help="only ok or only failed cells")
    results.add_argument("--jsonl", action="store_true", help="print one JSON record per row on stdout")
    results.add_argument(
        "--csv", metavar="FILE", help="write the rows as CSV, one column per record field (- for stdout)"
    )
    results.add_argument(
        "--json",
        action="store_true",
        help='print the table as one JSON object: {"columns": [...], "rows": [{column: value}, ...]}',
    )
    results.set_defaults(handler=cmd_results)

    plot = sub.add_parser(
        "plot", parents=[parent("db", "debug")], help="plot stored results as PNG and interactive HTML"
    )
    plot.add_argument("overrides", nargs="*", metavar="FILTER", help="PATH=VALUE filters, as for `ablate results`")
    plot.add_argument("--grid", help="only this grid's cells")
    plot.add_argument(
        "--out", default="results/plots", help="folder for the PNG and HTML files (default results/plots)"
    )
    plot.set_defaults(handler=cmd_plot)


# ---------------------------------------------------------------------------------------------- grid


def cmd_grid(args) -> int:
    """Expand, run what the store lacks, log to W&B, print the summary; 1 if any cell failed."""
    from ablate.grid.expansion import load_grid
    from ablate.grid.runner import run_grid
    from ablate.grid.store import Store
    from ablate.report.live import GridDisplay
    from ablate.report.tables import rows_table
    from ablate.report.tracking import GridTracker

    grid = load_grid(args.config, args.overrides, run_options(args), name=args.name, wandb=args.wandb)
    db = Path(args.db)
    if args.dry_run:
        return _dry_run(grid, db, args.json)
    display = GridDisplay(err)
    tracker = GridTracker(grid, db) if grid.wandb else None
    try:
        outcome = run_grid(
            grid,
            db,
            launcher=args.launcher,
            workers=args.workers,
            slurm=_slurm_params(args.slurm),
            rerun=args.rerun,
            retry_failed=args.retry_failed,
            display=display,
            on_result=tracker.log_cell if tracker else None,
        )
    finally:
        display.close()
    with Store(db) as store:
        rows = store.rows(grid=grid.id)
        failed = outcome.failed(store)
    if tracker:
        run_id = tracker.finish(rows)
        err.print(f"W&B: {len(rows)} cell runs and grid run {run_id}, group {grid.id}", highlight=False, markup=False)
    if args.json:
        for row in rows:
            print(json.dumps(row.record))
    else:
        out.print(rows_table(rows, f"grid {grid.id}", skipped=set(outcome.skipped)))
    err.print(
        f"{len(grid.cells)} cells: {len(outcome.measured)} measured now, {len(outcome.skipped)} from the store, "
        f"{len(failed)} failed. Results: `ablate results --db {db} --grid {grid.id}`",
        highlight=False,
        markup=False,
    )
    problems = []
    labels = {cell.key: cell.label for cell in grid.cells}
    if failed:
        problems.append(
            f"{len(failed)} of {len(grid.cells)} cells failed: "
            + "; ".join(f"`{labels[key]}` ({_error_of(rows, key)})" for key in failed[:10])
            + (f"; and {len(failed) - 10} more" if len(failed) > 10 else "")
            + f". Their errors are stored: `ablate results --db {db} --grid {grid.id} --status failed`; "
            f"--retry-failed measures them again."
        )
    if outcome.lost:
        problems.append(
            f"{len(outcome.lost)} cells were not stored because their worker died: "
            + "; ".join(f"`{labels[key]}` ({why})" for key, why in outcome.lost.items())
            + ". Run the grid again to measure them."
        )
    if problems:
        err.print(f"[bold red]error:[/] {escape(' '.join(problems))}", highlight=False, soft_wrap=True)
        return 1
    return 0


def _dry_run(grid, db: Path, as_json: bool) -> int:
    """Plan every cell on the meta device: its tokens, params and FLOPs, or the exact error it would fail with."""
    from ablate.grid.runner import plan_grid
    from ablate.grid.store import Store
    from ablate.report.tables import tokens_text

    status = {}
    if db.is_file():
        with Store(db) as store:
            status = store.status(cell.key for cell in grid.cells)
    with progress_bar() as bar:
        task = bar.add_task("planning the cells on the meta device", total=len(grid.cells))
        plans = plan_grid(grid, lambda done, _: bar.update(task, completed=done))
    failing = sum(1 for record in plans if record.get("error"))
    if as_json:
        for record in plans:
            print(json.dumps(record))
        return 1 if failing else 0
    table = Table(
        title=escape(f"grid {grid.id}: {len(grid.cells)} cells (dry run: built on the meta device, nothing runs)"),
        title_justify="left",
    )
    for column in ("#", "cell", "visual tok", "GFLOPs", "params M", "in the store", "ran as / would fail with"):
        table.add_column(column, justify="right" if column in ("#", "visual tok", "GFLOPs", "params M") else "left")
    for index, (cell, record) in enumerate(zip(grid.cells, plans), 1):
        error = record.get("error")
        flops, params = value_at(record, "flops.total"), value_at(record, "params.total")
        note = ", ".join(f"{key}={value}" for key, value in (record.get("choices") or {}).items())
        table.add_row(
            str(index),
            escape(cell.label),
            tokens_text(record),
            "-" if flops is None else f"{flops / 1e9:,.1f}",
            "-" if params is None else f"{params / 1e6:,.1f}",
            status.get(cell.key, "-"),
            f"[red]{escape(error['type'])}: {escape(error['message'])}[/]" if error else escape(note),
        )
    out.print(table)
    todo = sum(1 for cell in grid.cells if cell.key not in status)
    dropped = []
    if grid.excluded:
        dropped.append(f"{grid.excluded} excluded")
    if grid.merged:
        dropped.append(f"{grid.merged} merged with a cell that resolves alike")
    bounded = sum(1 for record in plans if record.get("count_basis") == "upper bound")
    out.print(
        f"{todo} to run, {len(grid.cells) - todo} already in {db}, {failing} would fail"
        + (f" ({', '.join(dropped)})" if dropped else "")
        + (f"; <=N: {bounded} cells decide their tokens by the image (an upper bound)" if bounded else ""),
        highlight=False,
        markup=False,
    )
    return 1 if failing else 0  # so that `ablate grid G --dry-run && ablate grid G` runs only a sound plan


def _slurm_params(items: list[str]) -> dict[str, Any]:
    from ablate.config.compose import parse_override

    params = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--slurm {item}: give KEY=VALUE, e.g. --slurm slurm_partition=gpu --slurm timeout_min=60."
            )
        key, value = parse_override(item)
        params[".".join(key)] = value
    return params


def _error_of(rows, key: str) -> str:
    record = next((row.record for row in rows if row.key == key), {})
    error = record.get("error") or {}
    message = str(error.get("message") or "").strip()
    first = message.split(". ")[0].rstrip(".")  # the first sentence says what is wrong; the store keeps the rest
    return f"{error.get('type')}: {first_line(first, width=200)}"


# ---------------------------------------------------------------------------------------------- results, plot


def cmd_results(args) -> int:
    from ablate.grid.store import Store
    from ablate.report import results
    from ablate.report.tables import columns_table, pivot_table, rows_table, write_csv

    sort = results.names(args.sort)
    layout = results.parse_pivot(args.pivot) if args.pivot else None
    with Store(args.db, create=False) as store:
        if args.grids:
            return _list_grids(store, args.db)
        rows = store.rows(grid=args.grid, filters=args.overrides, status=args.status)
        empty = store.explain_empty(args.overrides, args.grid, args.status) if not rows and args.overrides else ""
        results.check_paths(store, sort, "--sort path")
        columns = None
        if args.columns:
            columns = results.expand_columns(rows, results.names(args.columns))
            results.check_paths(store, columns, "--columns path")
        if layout:
            results.check_paths(store, [*layout[0], *layout[1:]], "--pivot path")
    rows = results.sort_rows(rows, sort, args.desc)
    if empty:
        err.print(f"No row matches: {empty}", highlight=False, markup=False)
    if args.csv:
        if args.csv == "-":
            write_csv(rows, sys.stdout, columns)
        else:
            with open(args.csv, "w", newline="") as handle:
                write_csv(rows, handle, columns)
            err.print(f"wrote {len(rows)} rows to {args.csv}", highlight=False, markup=False)
    if args.jsonl:
        for row in rows:
            print(json.dumps(row.record))
    if args.csv or args.jsonl:
        return 0
    title = f"{f'grid {args.grid}' if args.grid else args.db}: {len(rows)} rows"
    if layout:
        table = results.pivot(rows, *layout)
        if args.json:
            print(json.dumps(results.pivot_json(table), default=str))
            return 0
        out.print(pivot_table(table, title))
        for note in results.pivot_notes(table):
            out.print(f"note: {note}", highlight=False, markup=False)
    elif args.json:
        shown = columns or results.default_columns(rows)
        print(json.dumps({"columns": shown, "rows": results.flat_rows(rows, shown)}, default=str))
    elif columns:
        out.print(columns_table(rows, columns, title))
    else:
        out.print(rows_table(rows, title, show_key=True))
    return 0


def _list_grids(store, db) -> int:
    table = Table(title=f"grids in {db}", title_justify="left")
    for column in ("grid", "cells", "stored", "failed"):
        table.add_column(column)
    for grid_id in store.grid_ids():
        members = list(store.wandb_runs(grid_id))
        status = store.status(members)
        failed = sum(1 for value in status.values() if value == "failed")
        table.add_row(escape(grid_id), str(len(members)), str(len(status)), str(failed))
    out.print(table)
    return 0


def cmd_plot(args) -> int:
    """The plots of the store's rows (a grid's, filtered) into --out."""
    from ablate.grid.store import Store
    from ablate.report.plots import write_plots

    with Store(args.db, create=False) as store:
        rows = store.rows(grid=args.grid, filters=args.overrides)
    files, notes = write_plots([row.record for row in rows], args.out)
    for path in files:
        err.print(f"wrote {path}", highlight=False, markup=False)
    for note in notes:
        err.print(f"skipped {note}", highlight=False, markup=False)
    return 0
