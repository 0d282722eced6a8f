"""Running a grid: each cell measured once, its record in the results store, failures recorded, live progress.

Launchers decide where each cell runs, and on which GPU when a cell asks for `cuda`:
    local      in this process, one cell after another (default); `--workers N`: N worker processes, each given
               its own GPU (round robin over the visible ones) and an equal share of the CPU threads
    submitit   one SLURM job per cell (`pip install 'ablate-vlm[slurm]'`); `--slurm KEY=VALUE` sets submitit's
               executor parameters (slurm_partition=..., timeout_min=...; cluster=local runs the jobs as local
               processes); a cuda cell asks for one GPU
    ray        one Ray task per cell (`pip install 'ablate-vlm[ray]'`): a local Ray instance, or the cluster that
               RAY_ADDRESS names; a cuda cell asks for one GPU
Every worker writes its cell's row itself (the store takes concurrent writers) and hands the record back, so a
launcher that dies loses no finished cell, and a rerun picks up the rest. A worker checks its own machine (the
cell's device, threads, files) when the cell runs: a cell that cannot run there is stored with that error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.api.errors import AblateError, ConfigError, first_line
from ablate.grid.expansion import Grid
from ablate.grid.store import Store
from ablate.version import DISTRIBUTION

LAUNCHERS = ("local", "submitit", "ray")
EXTRAS = {"submitit": "slurm", "ray": "ray"}  # launcher -> the pip extra that installs its library

# ------------------------------------------------------------------------------------------- one cell


def run_cell(task: dict[str, Any], progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Measure one cell, store its record and return {key, record}. Every launcher runs this (it pickles).

    A failed cell is stored with its error; an interrupted one (Ctrl-C) is not stored, so a rerun measures it.
    """
    from ablate.measurement.measure import measure

    run = dict(task["run"])
    if task.get("device"):
        run["device"] = task["device"]
    try:
        record = measure(task["base"], task["overrides"], progress=progress, **run).to_dict()
    except AblateError as exc:
        record = exc.record.to_dict()
    with Store(task["db"]) as store:
        store.put(task["key"], record, task["label"])
    return {"key": task["key"], "record": record}


def plan_grid(grid: Grid, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Every cell's plan (`ablate.measurement.measure.plan`), in grid order: the model built on the meta device with
    its tokens, params and FLOPs, or the exact error the cell would fail with. Nothing runs or is stored, and this
    machine is not checked (a grid of cuda cells plans on a login node)."""
    from ablate.measurement.measure import plan

    plans = []
    for index, cell in enumerate(grid.cells):
        if progress:
            progress(index, len(grid.cells))
        try:
            plans.append(plan(grid.base, cell.overrides, **grid.run).to_dict())
        except AblateError as exc:
            plans.append(exc.record.to_dict())
    return plans


# ------------------------------------------------------------------------------------------- launchers


@dataclass
class Events:
    """What a launcher reports: a cell started (when it knows), finished (its result), or was lost (a worker died
    before storing it)."""

    started: Callable[[dict[str, Any]], None]
    finished: Callable[[dict[str, Any]], None]
    lost: Callable[[dict[str, Any], str], None]
    progress: Callable[[str, int, int], None] | None = None


def _require(module: str, launcher: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--launcher {launcher} needs the '{module}' package, which is not installed. Install it with "
            f"`pip install '{DISTRIBUTION}[{EXTRAS[launcher]}]'`, or use --launcher local."
        ) from None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_local(tasks: list[dict], events: Events, workers: int = 1, **_: Any) -> None:
    if workers <= 1:
        for task in tasks:
            events.started(task)
            events.finished(run_cell(task, events.progress))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    gpus = context.Queue()
    for index in range(workers):
        gpus.put(index % _gpu_count() if _gpu_count() else None)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(gpus, threads)) as pool:
        futures = {pool.submit(run_cell, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                try:
                    events.finished(future.result())
                except BrokenProcessPool:
                    events.lost(futures[future], "a worker process died (killed by the system, out of memory?)")
        except BaseException:  # Ctrl-C, or a failure while reporting: start no further cell
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _init_worker(gpus, threads: int) -> None:
    """Each worker process sees one GPU as cuda:0 (set before torch starts CUDA) and its share of CPU threads."""
    gpu = gpus.get()
    if gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    import torch

    torch.set_num_threads(threads)


def launch_submitit(
    tasks: list[dict], events: Events, workers: int | None = None, params: dict | None = None, folder: str = ""
) -> None:
    submitit = _require("submitit", "submitit")
    params = dict(params or {})
    executor = submitit.AutoExecutor(folder=folder, cluster=params.pop("cluster", None))
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Bad --slurm parameter: {exc}. See submitit's AutoExecutor.update_parameters.") from None
    limit = workers or len(tasks)  # SLURM queues everything; --workers caps the jobs in flight
    pending = list(tasks)
    running: dict[Any, dict] = {}
    while pending or running:
        while pending and len(running) < limit:
            task = pending.pop(0)
            gpus = 1 if task["device"].startswith("cuda") else 0
            executor.update_parameters(gpus_per_node=params.get("gpus_per_node", gpus))
            running[executor.submit(run_cell, task)] = task
            events.started(task)
        for job in [job for job in running if job.done()]:
            task = running.pop(job)
            try:
                events.finished(job.result())
            except Exception as exc:  # the job died (killed, timed out, preempted): nothing was stored
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]  # submitit puts the error last
                events.lost(task, f"job {job.job_id} failed: {last}")
        if running:
            time.sleep(0.5)


def launch_ray(tasks: list[dict], events: Events, workers: int | None = None, **_: Any) -> None:
    ray = _require("ray", "ray")
    started_here = not ray.is_initialized()
    if started_here:  # RAY_ADDRESS, if set, names a cluster; otherwise a local instance with --workers CPUs
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(
            num_cpus=workers if local and workers else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        remote = ray.remote(run_cell)
        refs = {}
        for task in tasks:
            gpus = 1 if task["device"].startswith("cuda") else 0
            refs[remote.options(num_cpus=1, num_gpus=gpus, max_retries=0).remote(task)] = task
            events.started(task)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            task = refs.pop(ready[0])
            try:
                events.finished(ray.get(ready[0]))
            except ray.exceptions.RayError as exc:  # the worker died: nothing was stored
                events.lost(task, f"the Ray task failed: {first_line(exc)}")
    finally:
        if started_here:
            ray.shutdown()


LAUNCH = {"local": launch_local, "submitit": launch_submitit, "ray": launch_ray}


# ------------------------------------------------------------------------------------------- the grid


@dataclass
class Outcome:
    """What a grid run did: measured now, found in the store, lost (a worker died), and the failed cells."""

    grid: Grid
    db: Path
    measured: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)  # key -> why
    wandb_runs: int = 0

    def failed(self, store: Store) -> list[str]:
        status = store.status(cell.key for cell in self.grid.cells)
        return [cell.key for cell in self.grid.cells if status.get(cell.key) == "failed"]


def _device(cell_device: str, launcher: str, workers: int) -> str:
    """A launcher that places cells on GPUs itself hands a bare `cuda` cell the GPU it gave it (seen as cuda:0)."""
    parallel = launcher != "local" or workers > 1
    return "cuda:0" if parallel and cell_device == "cuda" else cell_device


def run_grid(
    grid: Grid,
    db: str | Path,
    *,
    launcher: str = "local",
    workers: int = 1,
    slurm: dict[str, Any] | None = None,
    rerun: bool = False,
    retry_failed: bool = False,
    display: Any = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Measure the grid's cells that the store does not hold yet (all with `rerun`; failed ones with
    `retry_failed`), storing each as it finishes. `display` gets the events (see `ablate.report.live.GridDisplay`);
    `on_result` each finished cell's {key, record}, as it arrives (W&B logging)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"Unknown launcher '{launcher}' (--launcher). Choose one of: {', '.join(LAUNCHERS)}.")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}.")
    if launcher != "local":
        _require(launcher if launcher == "ray" else "submitit", launcher)  # say which extra before anything runs
    db = Path(db).resolve()
    outcome = Outcome(grid, db)
    with Store(db) as store:
        store.add_grid(grid.id, grid.name, grid.spec, [(cell.key, cell.label) for cell in grid.cells])
        have = store.status(cell.key for cell in grid.cells)
    todo = [
        cell for cell in grid.cells if rerun or cell.key not in have or (retry_failed and have[cell.key] == "failed")
    ]
    outcome.skipped = [cell.key for cell in grid.cells if cell not in todo]
    tasks = [
        {
            "key": cell.key,
            "label": cell.label,
            "base": grid.base,
            "overrides": list(cell.overrides),
            "run": grid.run,
            "device": _device(cell.device, launcher, workers),
            "db": str(db),
        }
        for cell in todo
    ]
    if display is not None:
        display.begin(grid, len(tasks), len(outcome.skipped), launcher, workers)

    def finished(result: dict[str, Any]) -> None:
        outcome.measured.append(result["key"])
        if display is not None:
            display.finished(result)
        if on_result is not None:
            on_result(result)

    def lost(task: dict[str, Any], why: str) -> None:
        outcome.lost[task["key"]] = why
        if display is not None:
            display.lost(task, why)

    events = Events(
        started=display.started if display is not None else (lambda task: None),
        finished=finished,
        lost=lost,
        progress=display.progress if display is not None else None,
    )
    folder = str(db.parent / "submitit" / grid.id)
    limit = workers if workers > 1 or launcher == "local" else None  # None: as many at once as the launcher likes
    LAUNCH[launcher](tasks, events, workers=limit, params=slurm, folder=folder)
    return outcome
