"""Time several callables alternately in one process, so machine noise hits all of them alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternate(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call for each candidate; the call order rotates every round to cancel drift."""
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            elapsed = (time.perf_counter() - start) * 1000.0
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples
