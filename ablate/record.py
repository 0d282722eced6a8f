"""The result record: one plain, versioned dict per run, the same from `ablate run --json`, `ablate.measure`, a grid
cell or a store row. Every key is always present (None when unknown), failed runs included.

Schema (version 2):
    schema_version, name
    visual_tokens           tokens of one image as the LLM receives them
    prompt_tokens, batch_size
    tokens{encoder, reducer, connector, llm_input}     out of each stage, and the LLM's whole input
    params{encoder, reducer, connector, decoder, total}
    flops{encoder, reducer, connector, prefill, total}
    latency_ms{preprocess, encoder, reducer, connector, prefill, stage_sum, ttft}   medians over repeats
    latency_spread_ms{...}  interquartile ranges of the same
    peak_memory_mb          this run's own peak (CPU: resident memory; GPU: allocated memory)
    encoder_form            e.g. 'inference' or 'train' for reparameterizable encoders
    weights[]               what was loaded ('kind: path'); empty for random weights
    image{source, width, height, sha256}     the image measured ('synthetic' or a path)
    run{...}                the run options as used (threads actually set, dtype per component, ...)
    env{device_name, ablate, plugins{name: version}, libraries{torch, timm, transformers, ...}, python, platform,
        cpu_count}
    config{...}             the resolved config, run section included (as asked for)
    fidelity                None, or with run.fidelity: {top1_agreement, kl, rows, reference}: the reduced model's
                            first token against the same model without its reducer (`ablate.fidelity`)
    execution{...}          how the timed stages ran (ablate.modes): requested{mode, dtypes, memory_format} vs
                            used{...}, stages{STAGE: how it ran}, ttft (one graph, or stages in turn), fallbacks[],
                            timer, setup_s, graph_breaks, deviation_from_eager{STAGE}, eager_ms (GPU), cpu{isa, bf16}
    roofline{peak, launch_bound_ratio, stages{STAGE and ttft: {flops, bytes, bytes_unfused, dtype, peak_tflops,
             intensity, floor_ms, bound, measured_ms, measured_over_floor, eager_ms, launch_bound}}}  (ablate.roofline)
    profile                 None, or {trace: path, top{STAGE: [{name, self_ms, calls, share}]}} (--profile)
    notes[]                 what a reader must know about the figures (count-only, data-dependent counts, ...)
    accuracy                None, or {exact_match, anls, n, chance, split, ...} for a trained model (`ablate eval`)
    error                   None, or {type, message, stage, plugin, log}
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import re
import resource
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ablate.counting import VISION_STAGES
from ablate.errors import AblateError, PluginFailure
from ablate.modes import empty_entry
from ablate.options import STAGES, RunOptions
from ablate.roofline import empty_roofline
from ablate.timing import LATENCY_KEYS
from ablate.version import __version__

SCHEMA_VERSION = 2
PARAM_KEYS = VISION_STAGES + ("decoder", "total")
TOKEN_KEYS = VISION_STAGES + ("llm_input",)


def empty_record() -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": None,
        "visual_tokens": None,
        "prompt_tokens": None,
        "batch_size": None,
        "tokens": dict.fromkeys(TOKEN_KEYS),
        "params": dict.fromkeys(PARAM_KEYS),
        "flops": dict.fromkeys(STAGES + ("total",)),
        "latency_ms": dict.fromkeys(LATENCY_KEYS),
        "latency_spread_ms": dict.fromkeys(LATENCY_KEYS),
        "peak_memory_mb": None,
        "encoder_form": None,
        "weights": [],
        "image": None,
        "run": None,
        "env": None,
        "config": None,
        "fidelity": None,
        "execution": empty_entry(),
        "roofline": empty_roofline(),
        "profile": None,
        "notes": [],
        "accuracy": None,
        "error": None,
    }


def error_entry(exc: BaseException, stage: str | None) -> dict[str, Any]:
    if isinstance(exc, KeyboardInterrupt):
        message = "Interrupted (Ctrl-C) before the run finished; what was measured so far is kept."
        return {"type": "KeyboardInterrupt", "message": message, "stage": stage, "plugin": None, "log": None}
    plugin = exc.plugin if isinstance(exc, PluginFailure) else None
    log = exc.log if isinstance(exc, PluginFailure) else None
    kind = type(exc).__name__ if isinstance(exc, AblateError) else f"unexpected {type(exc).__name__}"
    return {"type": kind, "message": str(exc), "stage": stage, "plugin": plugin, "log": log}


def run_entry(options: RunOptions) -> dict[str, Any]:
    """The run options as used: the thread count torch actually runs with, and each component's dtype."""
    used = dataclasses.asdict(options)
    used["threads"] = torch.get_num_threads()
    used["dtypes"] = {kind: str(options.dtype_of(kind)).removeprefix("torch.") for kind in used["dtypes"]}
    return used


def image_entry(path: str | None, image) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": "synthetic" if path is None else os.path.abspath(path)}
    if image is not None:
        entry["width"], entry["height"] = image.size
    if path is not None:
        entry["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return entry


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str | None]:
    """The installed version of every library ablate depends on (torch, transformers, ...), from package metadata."""
    try:
        requirements = metadata.requires("ablate") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return {"torch": torch.__version__}
    versions = {}
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device, plugin_versions: dict[str, str | None]) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device_name": name,
        "ablate": __version__,
        "plugins": plugin_versions,
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------------------------------------- peak memory

_CLEAR_REFS = "/proc/self/clear_refs"


def _resident_peak_kb() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory(device: torch.device, record: dict[str, Any]):
    """Measure this block's own peak memory into record['peak_memory_mb'], even when the block fails.

    GPU: torch's allocated-memory peak, reset first. CPU (Linux): the resident-set high-water mark, reset first through
    /proc/self/clear_refs, so earlier runs in the same process do not count. Where that reset is impossible the
    process's lifetime peak is reported, and a note says so.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open(_CLEAR_REFS, "w") as clear_refs:
                clear_refs.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        except OSError:
            record["notes"].append("peak_memory_mb is the process's lifetime peak (it could not be reset here).")
    try:
        yield
    finally:
        if device.type == "cuda":
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_kb = _resident_peak_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            record["peak_memory_mb"] = peak_kb / 1024
