"""`ablate run --profile`: a torch.profiler trace of one pass through the stages (Chrome trace JSON, which Perfetto
and chrome://tracing open), and the top kernels of each stage.

The trace covers one pass through the timed stages, as the run's mode runs them, each stage inside a range named
`ablate/STAGE`. The top-kernels tables come from one more pass, each stage profiled on its own so that nothing is
mis-attributed: on a GPU the kernels by device time, on a CPU the operators by their own CPU time. Profiling slows
what it watches; the record's latencies come from the timed repeats, never from these passes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ablate.measurement.record import KernelRow, Profile
from ablate.measurement.timing import synchronize

TOP = 5


def trace_path(option: str, name: str, mode: str) -> str:
    """The trace file: `run.profile` as given, or for 'auto' ablate-trace-NAME-MODE.json in the current folder."""
    if option == "auto":
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return os.path.abspath(f"ablate-trace-{safe}-{mode}.json")
    return os.path.abspath(option)


def profile_stages(execution, ctx, path: str, device: torch.device) -> Profile:
    """Write the trace to `path`; return it with each stage's top kernels."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        with profile(activities=activities) as whole:
            out: Any = ctx
            for name, stage in execution.stages:
                with record_function(f"ablate/{name}"):
                    out = stage(out)
                synchronize(device)
        whole.export_chrome_trace(path)
        top, out = {}, ctx
        for name, stage in execution.stages:
            with profile(activities=activities) as one:
                out = stage(out)
                synchronize(device)
            top[name] = _top(one, device)
    return Profile(trace=path, top=top)


def _top(prof, device: torch.device) -> list[KernelRow]:
    on_gpu = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if self_us > 0 and not event.key.startswith(("ablate/", "ProfilerStep")):
            rows.append((self_us, event.key, event.count))
    total = sum(us for us, _, _ in rows) or 1.0
    rows.sort(reverse=True)
    return [KernelRow(name=key, self_ms=us / 1000, calls=count, share=us / total) for us, key, count in rows[:TOP]]
