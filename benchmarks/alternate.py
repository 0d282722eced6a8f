"""Time several callables alternately in one process, so machine noise hits all of them alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# wall: elapsed time, what a user waits. cpu: this process's CPU time, the work itself; on a shared, oversubscribed
# machine it is far steadier than wall time, but only meaningful with one thread (idle threads spin and count).
# cuda: CUDA events around the call, the host waiting on the end one (GPU work is asynchronous: a host clock alone
# would time the launches only).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "cuda": None}


def elapsed_ms(fn: Callable[[], object], clock: str = "wall") -> float:
    """Milliseconds one call of `fn` takes on `clock`."""
    if clock == "cuda":
        torch.cuda.synchronize()  # nothing else queued: the start event fires when the call begins
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    now = CLOCKS[clock]
    begin = now()
    fn()
    return (now() - begin) * 1000.0


def alternate(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds per call for each candidate; the call order rotates every round to cancel drift."""
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = elapsed_ms(candidates[name], clock)
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples
