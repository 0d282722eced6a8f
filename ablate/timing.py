"""Stage timers: synchronized wall-clock samples, warm-up discarded, medians with spread."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StageTimer:
    """Collects per-repeat milliseconds for named stages; samples taken during warm-up are not kept."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.recording = False

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        synchronize(self.device)
        if self.recording:
            self.samples[name].append((time.perf_counter() - start) * 1000.0)
        return result

    def add(self, name: str, value_ms: float) -> None:
        if self.recording:
            self.samples[name].append(value_ms)


def spread(values: list[float]) -> float:
    """Interquartile range (p75 - p25): robust to one-off hiccups on a noisy machine; 0 for one sample."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1
