"""What every benchmark script shares: paired ratios from alternating samples, the environment, the JSON file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ablate.measurement.machine import cpu_features, cpu_name, library_versions


def iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def timing(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples), "iqr_ms": iqr(samples), "min_ms": min(samples), "n": len(samples)}


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and IQR of the per-round ratios: `alternate` runs both in every round, so each pair saw the same load."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "iqr": iqr(ratios), "min": min(ratios), "max": max(ratios)}


def environment(device: str = "cpu") -> dict[str, Any]:
    on_gpu = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(torch.device(device)) if on_gpu else cpu_name(),
        "cpu": None if on_gpu else dataclasses.asdict(cpu_features()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_json(path: str | None, benchmark: str, args: Any, results: Any) -> None:
    """Write {benchmark, args, environment, results} to `path` (default: benchmarks/results/BENCHMARK.json)."""
    target = Path(path) if path else Path(__file__).parent / "results" / f"{benchmark}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "args": vars(args),
        "environment": environment(getattr(args, "device", "cpu")),
        "results": results,
    }
    target.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {target}")


def parse_args(parser: argparse.ArgumentParser, benchmark: str, repeats: int = 5) -> argparse.Namespace:
    """Add the options every timing benchmark shares (device, repeats, threads, clock, JSON file), parse the command
    line and apply --threads."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu", "cuda"],
        default="wall",
        help="cpu: process CPU time (use with --threads 1); cuda: CUDA events (use on a GPU)",
    )
    parser.add_argument("--json", help=f"output file (default: benchmarks/results/{benchmark}.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
