"""The machine a run runs on: whether it can run the config at all (checked where the run happens, never when a
config or grid is resolved), what it is (CPU, libraries: the record's `env`), its free memory and the run's own peak.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING

import torch

from ablate.api.errors import ConfigError
from ablate.api.hooks import KINDS
from ablate.measurement.record import CpuFeatures, Environment, Record
from ablate.model.build import check_device
from ablate.version import DISTRIBUTION, __version__

if TYPE_CHECKING:  # pragma: no cover
    from ablate.config.compose import VLMConfig
    from ablate.config.run_options import RunOptions


# ------------------------------------------------------------------------------------------ can it run here


def check_machine(config: VLMConfig) -> None:
    """Raise a ConfigError or ResourceError naming the `run.` key (or the weights key) when this machine cannot run
    `config`: the device is not here, more threads than cores, a file the config names does not exist."""
    check_run_options(config.run)
    paths = [(f"{kind}.weights", getattr(config, kind).weights) for kind in KINDS] + [("weights", config.weights)]
    for key, path in paths:
        if path is not None and not os.path.exists(path):
            raise ConfigError(
                f"Weights path {path} ({key}) does not exist on this machine. Weights load from local files only "
                f"(nothing is downloaded): check the path, or remove the key to run with random weights."
            )


def check_run_options(options: RunOptions) -> None:
    """The run options' part of `check_machine`: device, threads, the image and the trace file's folder."""
    check_device(options.device)
    cores = os.cpu_count() or 1
    if options.threads is not None and options.threads > cores:
        raise ConfigError(
            f"run.threads (--threads) must be between 1 and {cores} (this machine's CPU count), not {options.threads}. "
            f"Leave it unset for torch's default."
        )
    if options.image is not None and not os.path.isfile(options.image):
        raise ConfigError(f"Image file {options.image} (run.image, --image) does not exist. Give a PNG or JPEG path.")
    if options.profile not in (None, "auto") and not os.path.isdir(os.path.dirname(os.path.abspath(options.profile))):
        raise ConfigError(
            f"The folder of the trace file {options.profile} (run.profile, --profile) does not exist: create it or "
            f"give another path (--profile alone writes ablate-trace-NAME-MODE.json here)."
        )


# ------------------------------------------------------------------------------------------- what it is


def _proc_fields(path: str) -> dict[str, list[str]]:
    """A /proc file of `key: value` lines as {key: [value, ...]} (/proc/cpuinfo repeats keys per CPU); {} without it."""
    fields: dict[str, list[str]] = {}
    try:
        with open(path) as lines:
            for line in lines:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), []).append(value.strip())
    except OSError:
        pass
    return fields


@functools.cache
def _cpuinfo() -> dict[str, list[str]]:
    return _proc_fields("/proc/cpuinfo")


def cpu_name() -> str:
    names = _cpuinfo().get("model name")
    return names[0] if names else platform.processor() or platform.machine()


def cpu_ghz() -> float | None:
    """The highest clock /proc/cpuinfo reports (the base clock under a hypervisor, which hides boost)."""
    clocks = []
    for value in _cpuinfo().get("cpu MHz", []):
        try:
            clocks.append(float(value))
        except ValueError:
            pass
    return max(clocks) / 1000 if clocks else None


def cpu_features() -> CpuFeatures:
    """The instruction set torch dispatches to, and whether the CPU computes in bfloat16 natively (AVX512-BF16, AMX)."""
    flags = set((_cpuinfo().get("flags") or [""])[0].split())
    isa = torch.backends.cpu.get_cpu_capability()
    return CpuFeatures(
        isa=isa,
        bf16=bool(flags & {"avx512_bf16", "amx_bf16"}) or "AMX" in isa.upper(),
        amx="amx_tile" in flags,
        mkldnn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    )


def library_versions() -> dict[str, str | None]:
    """The installed version of every library ablate depends on (torch, transformers, ...), from package metadata."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device, plugin_versions: dict[str, str | None]) -> Environment:
    return Environment(
        device_name=device_name(device),
        ablate=__version__,
        plugins=plugin_versions,
        libraries=library_versions(),
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
    )


# ---------------------------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device` now (None where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for value in _proc_fields("/proc/meminfo").get("MemAvailable", []):
        return int(value.split()[0]) * 1024  # "12345 kB"
    return None


_CLEAR_REFS = "/proc/self/clear_refs"


def _resident_peak_kb() -> int | None:
    for value in _proc_fields("/proc/self/status").get("VmHWM", []):
        return int(value.split()[0])  # "12345 kB"
    return None


@contextmanager
def peak_memory(device: torch.device, record: Record) -> Iterator[None]:
    """Measure this block's own peak memory into record.peak_memory_mb, even when the block fails.

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
            record.notes.append("peak_memory_mb is the process's lifetime peak (it could not be reset here).")
    try:
        yield
    finally:
        if device.type == "cuda":
            record.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_kb = _resident_peak_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            record.peak_memory_mb = peak_kb / 1024
