"""Time several callables alternately in one process, so machine noise hits all of them alike."""

from __future__ import annotations

import time
from collections.abc import Callable

# wall: elapsed time, what a user waits. cpu: this process's CPU time, the work itself; on a shared, oversubscribed
# machine it is far steadier than wall time, but only meaningful with one thread (idle threads spin and count).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternate(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds per call for each candidate; the call order rotates every round to cancel drift."""
    now = CLOCKS[clock]
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            candidates[name]()
            elapsed = (now() - start) * 1000.0
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples
