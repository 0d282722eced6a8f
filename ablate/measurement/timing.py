"""Stage timing: synchronized samples, warm-up discarded, medians with spread and minima, repeats until a stated
precision if asked, and flags for what a careful reader would distrust (README: "Timings you can trust").

Sync discipline. CPU: perf_counter around each call (the work is done when the call returns). GPU: the device is
synchronized before each timed call, so no earlier work is queued and the start event fires when the call begins;
CUDA events are recorded around the call, and the host waits on the end event before reading the elapsed time.
A sample is thus the call's launch plus its GPU work, the latency a user sees, without the host's
synchronization jitter. Nothing is timed while another timed call's work is still in flight.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ablate.api.components import StageContext
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import cpu_ticks, load_average, others_share, usable_cpus
from ablate.measurement.record import Latency, Timing, TimingFlag
from ablate.model.vlm import STAGES

# Progress callback: (what is happening, step done, steps in all).
Progress = Callable[[str, int, int], None]

STAGE_SUM_TOLERANCE = 0.05  # |stage sum - TTFT| / TTFT beyond this is flagged (`stage_sum`)
BUSY_SHARE = 0.25  # other processes' share of the CPUs' time while timing beyond this is flagged (`busy`)
DEFAULT_MAX_TIME_S = 60.0  # run.precision's time budget when run.max_time_s is unset


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StageTimer:
    """Collects per-repeat milliseconds for named stages; samples taken during warm-up are not kept.

    `current` names the stage being run, so that a failure can be blamed on the right component.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.recording = False
        self.current: str | None = None

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.current = name
        synchronize(self.device)
        if self.device.type == "cuda":
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
            result = fn(*args)
            end_event.record()
            end_event.synchronize()
            elapsed = start_event.elapsed_time(end_event)
        else:
            start = time.perf_counter()
            result = fn(*args)
            synchronize(self.device)
            elapsed = (time.perf_counter() - start) * 1000.0
        if self.recording:
            self.samples[name].append(elapsed)
        self.current = None
        return result


def spread(values: list[float]) -> float:
    """Interquartile range (p75 - p25): robust to one-off hiccups on a noisy machine; 0 for one sample."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


@dataclass
class Timed:
    """What `time_stages` measured: per-stage medians, spreads (IQR) and minima in ms, how the repeats went, and the
    last vision output."""

    median: Latency
    spread: Latency
    minimum: Latency
    timing: Timing
    vision_out: StageContext


def time_stages(
    execution,
    prepare: Callable[[], torch.Tensor],
    ctx: StageContext,
    options: RunOptions,
    timer: StageTimer,
    progress: Progress,
) -> Timed:
    """Time preprocessing, each stage and one-call TTFT over the repeats; medians, spreads and minima, and what in
    them to distrust (`timing_flags`).

    `execution` (ablate.measurement.modes.Execution) holds the stages to call in order and the one-call TTFT, as the
    run's mode made them. Every repeat times the whole TTFT as one call and the stages one by one, so both see the
    same machine state; which goes first alternates, so slow drift (clocks, caches) hits both alike. Exactly
    run.repeats repeats are timed, or under run.precision as many more as it takes to reach that precision, until
    run.max_time_s is spent. The stage sum is the sum of the stage medians (minima: of the stage minima); its spread
    is that of the per-repeat sums.
    """
    planned = options.warmup + options.repeats
    budget = DEFAULT_MAX_TIME_S if options.max_time_s is None else options.max_time_s
    vision_out = ctx
    with torch.inference_mode():
        for step in range(options.warmup):
            progress("warming up", step, planned)
            vision_out = _repeat(execution, prepare, ctx, timer, step)
        timer.recording = True
        ticks, start, taken, stop = cpu_ticks(), time.perf_counter(), 0, "repeats"
        while True:
            step = options.warmup + taken
            progress("timing", step, max(planned, step + 1))
            vision_out = _repeat(execution, prepare, ctx, timer, step)
            taken += 1
            if taken < options.repeats:
                continue
            if options.precision is None:
                break
            if (median_precision(timer.samples["ttft"]) or math.inf) <= options.precision:
                stop = "precision reached"
                break
            if time.perf_counter() - start >= budget:
                stop = "time budget"
                break
        seconds = time.perf_counter() - start
        busy = others_share(ticks, cpu_ticks())
        progress("done", step + 1, step + 1)
    samples = timer.samples
    keys = [f.name for f in dataclasses.fields(Latency) if f.name != "stage_sum"]
    medians = {key: statistics.median(samples[key]) for key in keys}
    spreads = {key: spread(samples[key]) for key in keys}
    minima = {key: min(samples[key]) for key in keys}
    medians["stage_sum"] = sum(medians[name] for name in STAGES)
    minima["stage_sum"] = sum(minima[name] for name in STAGES)
    spreads["stage_sum"] = spread([sum(parts) for parts in zip(*(samples[name] for name in STAGES))])
    timing = Timing(
        repeats=taken,
        stop=stop,
        seconds=seconds,
        precision=median_precision(samples["ttft"]),
        busy_share=busy,
        load_average=load_average(),
    )
    median, spread_ms = Latency(**medians), Latency(**spreads)
    timing.flags = timing_flags(median, spread_ms, timing, options)
    return Timed(median, spread_ms, Latency(**minima), timing, vision_out)


def _repeat(execution, prepare: Callable[[], torch.Tensor], ctx: StageContext, timer: StageTimer, step: int):
    """One repeat: preprocessing, then TTFT as one call and the stages one by one (TTFT first on odd steps);
    returns the input the prefill got (the vision output)."""
    timer("preprocess", prepare)
    if step % 2:
        timer("ttft", execution.ttft, ctx)
    out: Any = ctx
    vision_out = ctx
    for name, stage in execution.stages:
        if name == "prefill":
            vision_out = out
        out = timer(name, stage, out)
    if not step % 2:
        timer("ttft", execution.ttft, ctx)
    return vision_out


def median_precision(values: list[float]) -> float | None:
    """The relative standard error of the median of `values`: 1.2533 x sigma / sqrt(n) / median, the normal
    approximation, with sigma = 1.4826 x the median absolute deviation (robust to outliers); None below 3 samples."""
    if len(values) < 3:
        return None
    median = statistics.median(values)
    if median <= 0:
        return None
    deviation = statistics.median(abs(value - median) for value in values)
    return 1.2533 * 1.4826 * deviation / math.sqrt(len(values)) / median


def timing_flags(median: Latency, spread_ms: Latency, timing: Timing, options: RunOptions) -> list[TimingFlag]:
    """What a careful reader would distrust in the timings; the README's "Timings you can trust" lists each."""
    flags = []
    ttft = median.ttft
    if ttft and median.stage_sum is not None:
        gap = (median.stage_sum - ttft) / ttft
        if abs(gap) > STAGE_SUM_TOLERANCE:
            flags.append(
                TimingFlag(
                    "stage_sum",
                    f"the stage sum is {gap:+.0%} off TTFT ({median.stage_sum:,.2f} vs {ttft:,.2f} ms, tolerance "
                    f"{STAGE_SUM_TOLERANCE:.0%}): the stages timed one by one do not add up to the one call, from "
                    f"noise or per-call overhead; rerun on a quiet machine, with more repeats (--precision).",
                )
            )
    if ttft and spread_ms.ttft is not None and spread_ms.ttft > options.max_spread * ttft:
        flags.append(
            TimingFlag(
                "spread",
                f"TTFT's interquartile range is {spread_ms.ttft / ttft:.0%} of its median (run.max_spread "
                f"{options.max_spread:.0%}): the repeats disagree; rerun on a quiet machine, with more repeats "
                f"(--precision).",
            )
        )
    if timing.busy_share is not None and timing.busy_share > BUSY_SHARE:
        load = "" if timing.load_average is None else f"; 1-minute load average {timing.load_average:.1f}"
        flags.append(
            TimingFlag(
                "busy",
                f"other processes used {timing.busy_share:.0%} of the CPUs' time while timing (threshold "
                f"{BUSY_SHARE:.0%}{load}, {len(usable_cpus())} CPUs): the timings are slower and noisier than on a quiet "
                f"machine; rerun when it is idle.",
            )
        )
    if options.precision is not None and (timing.precision is None or timing.precision > options.precision):
        reached = "unknown" if timing.precision is None else f"{timing.precision:.2%}"
        flags.append(
            TimingFlag(
                "precision",
                f"the TTFT median's relative standard error is {reached} after {timing.repeats} repeats in "
                f"{timing.seconds:,.1f} s, not the {options.precision:.2%} asked (run.precision): raise "
                f"run.max_time_s (--max-time-s) or quiet the machine.",
            )
        )
    return flags
