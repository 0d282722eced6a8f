"""W&B tracking: one W&B run per measured config (grouped by grid), and one grid-level run with a table and the plots.

This is the only module that imports wandb. Nothing here names an entity or a project: W&B's own settings decide
(WANDB_ENTITY, WANDB_PROJECT, WANDB_RUN_GROUP, `wandb login`); WANDB_MODE=offline writes runs to ./wandb (or
WANDB_DIR) for a later `wandb sync`. Every run is finished, whatever happens while logging it; a failed cell's run is
finished with exit code 1, which W&B shows as failed.

What a cell's run holds:
    config     the resolved config flattened with dots (`encoder.image_size`, `run.repeats`), plus `grid.id`,
               `cell.key`, `cell.label` and the environment (`env.device_name`, `env.libraries.torch`, ...)
    summary    the record's figures under stable names, its keys joined with '/': `latency_ms/ttft`,
               `latency_ms/encoder`, `visual_tokens`, `params/total`, `flops/total`, `peak_memory_mb`, any extra
               numeric field a plugin adds (`accuracy`), and `status` ('ok' or 'failed') with `error/type`,
               `error/message` for a failed cell
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ablate.errors import ConfigError

NOT_FIGURES = ("config", "run", "env", "image", "notes", "weights", "error", "schema_version", "name")
CELL_JOB = "cell"
RUN_JOB = "run"
GRID_JOB = "grid"


def _wandb():
    import wandb  # imported here only: the rest of ablate runs without touching it

    return wandb


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def figures(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's numbers under stable '/'-joined names, plus its status and error."""
    numbers = {
        key: value
        for key, value in flatten({k: v for k, v in record.items() if k not in NOT_FIGURES}, sep="/").items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    error = record.get("error")
    numbers["status"] = "failed" if error else "ok"
    if isinstance(error, Mapping):
        numbers.update({f"error/{key}": value for key, value in error.items() if value is not None})
    return numbers


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
            f"W&B could not start a run: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            f". Log in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline to write runs locally, or drop "
            f"--wandb."
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
        run.summary.update(figures(record))
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
    lines = [{"cell.key": row.key, "cell.label": row.label, **figures(row.record)} for row in rows]
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
