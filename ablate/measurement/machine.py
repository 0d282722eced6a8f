"""The machine a run runs on: whether it can run the config at all (checked where the run happens, never when a
config or grid is resolved), what it is (CPU, libraries: the record's `env`), how busy other processes keep it
while timing, its free memory and the run's own peak.
"""

from __future__ import annotations

import ctypes
import functools
import gc
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
    if options.export is not None and os.path.exists(options.export) and os.listdir(options.export):
        raise ConfigError(
            f"The export folder {options.export} (run.export, --out) is not empty: give a new or empty folder, so "
            f"that its manifest describes every file in it."
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


# --------------------------------------------------------------------------------------------- how busy


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def cpu_ticks() -> tuple[int, int, int] | None:
    """CPU time so far in clock ticks, over the CPUs this process may run on: (all, non-idle, this process's own);
    None without /proc. Two readings give the share of the CPUs' time other processes used in between."""
    cpus = {f"cpu{index}" for index in usable_cpus()}
    total = busy = 0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                name, *values = line.split()
                if name not in cpus:  # the first line, "cpu", sums all of the machine's
                    continue
                ticks = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]  # steal counts as busy: another guest had the core
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        own = int(fields[11]) + int(fields[12])  # utime and stime, all threads (fields 14 and 15 of proc(5))
    except (OSError, ValueError, IndexError):
        return None
    return total, busy, own


def others_share(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> float | None:
    """The share of the CPUs' time between two `cpu_ticks` readings that other processes used (0..1)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return min(max(other / (after[0] - before[0]), 0.0), 1.0)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device` now (None where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for value in _proc_fields("/proc/meminfo").get("MemAvailable", []):
        return int(value.split()[0]) * 1024  # "12345 kB"
    return None


def _status_bytes(key: str) -> int | None:
    """VmRSS, VmHWM, ... of /proc/self/status in bytes (None without it)."""
    for value in _proc_fields("/proc/self/status").get(key, []):
        return int(value.split()[0]) * 1024  # "12345 kB"
    return None


def _reset_resident_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _return_freed_heap() -> None:
    """Give heap memory earlier runs freed back to the OS (glibc's malloc_trim), so this run cannot reuse it unseen."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _lifetime_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


@contextmanager
def peak_memory(device: torch.device, record: Record, count_only: bool = False) -> Iterator[None]:
    """Measure what this block allocates at its peak, above the process's memory when it starts, into
    record.peak_memory_mb (and the baseline and method into record.memory), even when the block fails.

    GPU: torch's allocated-memory peak, reset at the start, minus what was allocated then. CPU (Linux): the resident
    set's high-water mark, reset at the start through /proc/self/clear_refs, minus the resident set then, so earlier
    runs in the same process count neither in the baseline's peak nor in this one. Count-only allocates nothing:
    no peak (None), the method says why.
    """
    memory = record.memory
    if count_only:
        memory.method = "count-only: no weights or activations were allocated, so no peak was measured"
        read = None
    elif device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory.method = (
            "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats at the start, minus "
            "torch.cuda.memory_allocated then"
        )

        def read() -> int:
            return torch.cuda.max_memory_allocated(device)

    else:
        _return_freed_heap()
        baseline = _status_bytes("VmRSS")
        if baseline is not None and _reset_resident_peak():
            memory.method = (
                "CPU: the resident set's high-water mark (VmHWM) after resetting it through /proc/self/clear_refs "
                "at the start, minus the resident set (VmRSS) then; heap freed by earlier runs is first returned to "
                "the OS (malloc_trim)"
            )

            def read() -> int:
                return _status_bytes("VmHWM") or 0

        else:
            baseline = _lifetime_peak_bytes()
            memory.method = (
                "CPU: the growth of the process's lifetime resident peak (getrusage ru_maxrss; it cannot be reset "
                "here): a lower bound, 0 when an earlier run of the process peaked higher"
            )
            record.notes.append(f"peak_memory_mb is a lower bound here: {memory.method}.")
            read = _lifetime_peak_bytes
    if read is not None:
        memory.baseline_mb = baseline / 2**20
    try:
        yield
    finally:
        if read is not None:
            peak = read()
            memory.process_peak_mb = max(peak, baseline) / 2**20
            record.peak_memory_mb = max(peak - baseline, 0) / 2**20
