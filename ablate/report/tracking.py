"""W&B tracking: one W&B run per measured config (grouped by grid), and one grid-level run with a table and the plots.

Records are logged in their JSON form. Nothing here names an entity or a project: W&B's own settings decide
(WANDB_ENTITY, WANDB_PROJECT, WANDB_RUN_GROUP, `wandb login`); WANDB_MODE=offline writes runs to ./wandb (or
WANDB_DIR) for a later `wandb sync`. Every run is finished, whatever happens while logging it; a failed cell's run is
finished with exit code 1, which W&B shows as failed.

What a cell's run holds:
    config     the resolved config flattened with dots (`encoder.image_size`, `run.repeats`), plus `grid.id`,
               `cell.key`, `cell.label` and the environment (`env.device_name`, `env.libraries.torch`, ...)
    summary    the record's numbers under the names its definition gives them (`ablate.measurement.record.metrics`:
               the field path joined with '/': `latency_ms/ttft`, `visual_tokens`, `flops/total`,
               `roofline/stages/prefill/floor_ms`, `accuracy/exact_match`), and `status` ('ok' or 'failed') with
               `error/type`, `error/message` for a failed cell
The training loop logs its loss curve to W&B itself (`ablate.train.loop`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ablate.api.errors import ConfigError, first_line
from ablate.grid.expansion import Grid
from ablate.grid.store import Store
from ablate.measurement.record import flatten, metrics

CELL_JOB = "cell"
RUN_JOB = "run"
GRID_JOB = "grid"


def _wandb():
    import wandb  # imported here only: the rest of ablate runs without touching it

    return wandb


def run_config(record: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = flatten(record.get("config") or {})
    env = record.get("env") or {}
    config.update(flatten({"env": {k: v for k, v in env.items() if k != "plugins"}}))
    config.update(extra or {})
    return config


def _init(wandb, **kwargs):
    try:
        # console="off": never wrap stdout, which may carry JSON; silent: W&B's banner would break the one-paragraph
        # rule of our stderr.
        return wandb.init(reinit="create_new", settings=wandb.Settings(console="off", silent=True), **kwargs)
    except Exception as exc:  # W&B reports a missing login and bad settings as its own exception types
        raise ConfigError(
            f"W&B could not start a run: {first_line(exc)}. Log in (`wandb login` or WANDB_API_KEY), or set "
            f"WANDB_MODE=offline to write runs locally, or drop --wandb."
        ) from None


def log_record(
    record: Mapping[str, Any],
    *,
    group: str | None = None,
    job_type: str = RUN_JOB,
    name: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> str:
    """One W&B run holding `record`; returns the run's id. Failed records make failed runs."""
    wandb = _wandb()
    run = _init(wandb, group=group, job_type=job_type, name=name, config=run_config(record, extra_config))
    failed = bool(record.get("error"))
    try:
        run.summary.update(metrics(record))
        if record.get("notes"):
            run.summary["notes"] = "\n".join(record["notes"])
    finally:
        run.finish(exit_code=1 if failed else 0)
    return run.id


def log_grid(
    grid_id: str,
    spec: Mapping[str, Any],
    rows: Iterable[Any],
    plot_files: Iterable[Path] = (),
    plots_note: str | None = None,
) -> str:
    """The grid-level run: a wandb.Table with one line per cell, the plots (PNG images, interactive HTML)."""
    wandb = _wandb()
    rows = list(rows)
    lines = [{"cell.key": row.key, "cell.label": row.label, **metrics(row.record)} for row in rows]
    columns = list(dict.fromkeys(key for line in lines for key in line))
    table = wandb.Table(columns=columns, data=[[line.get(column) for column in columns] for line in lines])
    failed = sum(1 for line in lines if line["status"] == "failed")
    run = _init(wandb, group=grid_id, job_type=GRID_JOB, name=grid_id, config=flatten({"grid": dict(spec)}))
    try:
        logged: dict[str, Any] = {"cells": table}
        for path in plot_files:
            if path.suffix == ".png":
                logged[f"plots/{path.stem}"] = wandb.Image(str(path))
            elif path.suffix == ".html":
                logged[f"plots/{path.stem}_interactive"] = wandb.Html(path.read_text())
        run.log(logged)
        run.summary.update({"cells": len(lines), "cells_ok": len(lines) - failed, "cells_failed": failed})
        if plots_note:
            run.summary["plots_note"] = plots_note
    finally:
        run.finish(exit_code=1 if failed else 0)
    return run.id


class GridTracker:
    """W&B for a grid: each cell's run as its result arrives; at the end, any stored cell of the grid not yet logged
    (measured by an earlier, interrupted run) and the grid-level run with the table and the plots."""

    def __init__(self, grid: Grid, db: Path):
        self.grid, self.db = grid, db

    def _log(self, key: str, record: Mapping[str, Any], store: Store) -> None:
        cell = next(cell for cell in self.grid.cells if cell.key == key)
        extra = {"grid.id": self.grid.id, "grid.name": self.grid.name, "cell.key": key, "cell.label": cell.label}
        run_id = log_record(record, group=self.grid.id, job_type=CELL_JOB, name=cell.label, extra_config=extra)
        store.set_wandb(self.grid.id, key, run_id)

    def log_cell(self, result: dict[str, Any]) -> None:
        with Store(self.db) as store:
            self._log(result["key"], result["record"], store)

    def finish(self, rows) -> str:
        """Log what is missing and the grid run; returns the grid run's id."""
        import tempfile

        from ablate.report.plots import write_plots

        with Store(self.db) as store:
            logged = store.wandb_runs(self.grid.id)
            for row in rows:
                if not logged.get(row.key):
                    self._log(row.key, row.record, store)
        with tempfile.TemporaryDirectory() as folder:
            files, note = [], None
            try:
                files, notes = write_plots([row.record for row in rows], folder, plotly_js="cdn")
                note = "; ".join(notes) or None
            except ConfigError as exc:  # no plotting libraries, or nothing timed to plot
                note = str(exc)
            return log_grid(self.grid.id, self.grid.spec, rows, files, note)
