"""Stage timing: synchronized samples, warm-up discarded, medians with spread.

Sync discipline. CPU: perf_counter around each call (the work is done when the call returns). GPU: the device is
synchronized before each timed call, so no earlier work is queued and the start event fires when the call begins;
CUDA events are recorded around the call, and the host waits on the end event before reading the elapsed time.
A sample is thus the call's launch plus its GPU work, the latency a user sees, without the host's
synchronization jitter. Nothing is timed while another timed call's work is still in flight.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ablate.api.components import StageContext
from ablate.config.run_options import RunOptions
from ablate.measurement.record import Latency
from ablate.model.vlm import STAGES

# Progress callback: (what is happening, step done, steps in all).
Progress = Callable[[str, int, int], None]


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


def time_stages(
    execution,
    prepare: Callable[[], torch.Tensor],
    ctx: StageContext,
    options: RunOptions,
    timer: StageTimer,
    progress: Progress,
) -> tuple[Latency, Latency, StageContext]:
    """Medians and spreads (ms) of preprocessing, each stage, their sum and one-call TTFT; and the last vision output.

    The stage sum is the sum of the stage medians; its spread is that of the per-repeat sums. `execution`
    (ablate.measurement.modes.Execution) holds the stages to call in order and the one-call TTFT, as the run's mode
    made them. Every repeat times the whole TTFT as one call and the stages one by one, so both see the same
    machine state; which goes first alternates, so slow drift (clocks, caches) hits both alike.
    """
    total = options.warmup + options.repeats
    vision_out = ctx
    with torch.inference_mode():
        for step in range(total):
            progress("warming up" if step < options.warmup else "timing", step, total)
            timer.recording = step >= options.warmup
            timer("preprocess", prepare)
            if step % 2:
                timer("ttft", execution.ttft, ctx)
            out: Any = ctx
            for name, stage in execution.stages:
                if name == "prefill":
                    vision_out = out
                out = timer(name, stage, out)
            if not step % 2:
                timer("ttft", execution.ttft, ctx)
        progress("done", total, total)
    samples = timer.samples
    keys = [f.name for f in dataclasses.fields(Latency) if f.name != "stage_sum"]
    medians = {key: statistics.median(samples[key]) for key in keys}
    spreads = {key: spread(samples[key]) for key in keys}
    medians["stage_sum"] = sum(medians[name] for name in STAGES)
    spreads["stage_sum"] = spread([sum(parts) for parts in zip(*(samples[name] for name in STAGES))])
    return Latency(**medians), Latency(**spreads), vision_out
