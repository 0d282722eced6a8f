"""Roofline figures per stage: how far each measured stage is from what the device could do.

For each stage: FLOPs (the record's, counted on the meta device), bytes moved, the device's peak for the stage's
dtype, the floor time max(FLOPs / peak, bytes / bandwidth), and measured / floor.

Bytes, estimated on the meta device:
    bytes          the least any implementation must move: the weights the stage reads (an embedding table only
                   the rows it looks up) plus the stage's input and output (a fully fused kernel). The floor uses it,
                   so the floor is a true lower bound.
    bytes_unfused  every operator reading its inputs and writing its outputs (views are free): the traffic when
                   nothing is fused. A stage whose bytes_unfused / bandwidth is near its measured time is
                   memory-bound as written (FastViTHD's depthwise convolutions on a GPU).

Peaks: GPUs from PEAKS (spec-sheet dense figures, no sparsity; float32 without TF32), CPUs estimated from the
instruction set, clock and thread count, with the memory bandwidth measured by a copy; `run.peak.tflops` and
`run.peak.bandwidth_gbs` override either. A stage timed in cudagraph mode whose eager time (also measured) is at
least LAUNCH_BOUND_RATIO times its graph time is flagged `launch_bound`: eager timing there measures kernel
launches, not the model.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ablate.api.components import StageContext
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import cpu_features, cpu_ghz
from ablate.measurement.record import Execution, Peak, Record, Roofline, StageRoofline
from ablate.model.vlm import STAGE_COMPONENT, STAGES

LAUNCH_BOUND_RATIO = Roofline().launch_bound_ratio

# Substring of torch.cuda.get_device_name() -> TFLOP/s per dtype (dense) and memory bandwidth in GB/s.
# The first match wins, so specific names come before general ones ("GH200" before "H200", "H100 PCIe" before "H100").
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "bandwidth_gbs": 4000.0}),
    ("H200", {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "bandwidth_gbs": 4800.0}),
    ("H100 PCIe", {"float32": 51.0, "bfloat16": 756.0, "float16": 756.0, "bandwidth_gbs": 2000.0}),
    ("H100", {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "bandwidth_gbs": 3350.0}),
    ("B200", {"float32": 80.0, "bfloat16": 2250.0, "float16": 2250.0, "bandwidth_gbs": 8000.0}),
    ("A100-SXM4-80GB", {"float32": 19.5, "bfloat16": 312.0, "float16": 312.0, "bandwidth_gbs": 2039.0}),
    ("A100 80GB", {"float32": 19.5, "bfloat16": 312.0, "float16": 312.0, "bandwidth_gbs": 1935.0}),
    ("A100", {"float32": 19.5, "bfloat16": 312.0, "float16": 312.0, "bandwidth_gbs": 1555.0}),
    ("L40S", {"float32": 91.6, "bfloat16": 362.0, "float16": 362.0, "bandwidth_gbs": 864.0}),
    ("L4", {"float32": 30.3, "bfloat16": 121.0, "float16": 121.0, "bandwidth_gbs": 300.0}),
    ("RTX 4090", {"float32": 82.6, "bfloat16": 165.2, "float16": 165.2, "bandwidth_gbs": 1008.0}),
    ("A10", {"float32": 31.2, "bfloat16": 125.0, "float16": 125.0, "bandwidth_gbs": 600.0}),
    ("V100", {"float32": 15.7, "bfloat16": 15.7, "float16": 125.0, "bandwidth_gbs": 900.0}),
    ("T4", {"float32": 8.1, "bfloat16": 8.1, "float16": 65.0, "bandwidth_gbs": 320.0}),
]

# CPU FLOPs per cycle per core, by what torch dispatches to: fused multiply-adds x vector width x 2 pipes.
CPU_FP32_FLOPS_PER_CYCLE = {"AVX512": 64, "AVX2": 32, "DEFAULT": 8}
CPU_BF16_FLOPS_PER_CYCLE = {"amx": 1024, "avx512_bf16": 128}  # without either, bfloat16 runs at float32 speed or less


# ---------------------------------------------------------------------------------------------- peaks


def device_peak(device: torch.device, options: RunOptions, cpu_name: str | None = None) -> Peak:
    """The device's peak: from the GPU table, a CPU estimate, or the config's `run.peak` override."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        match = next(((key, row) for key, row in PEAKS if key.lower() in name.lower()), None)
        if match:
            key, row = match
            peak = Peak(
                name=name,
                tflops={dtype: row[dtype] for dtype in ("float32", "bfloat16", "float16")},
                bandwidth_gbs=row["bandwidth_gbs"],
                source=f"table (ablate.measurement.roofline.PEAKS['{key}'], spec sheet, dense)",
            )
        else:
            peak = Peak(name=name, source="unknown GPU: set run.peak.*")
    else:
        peak = _cpu_peak(cpu_name)
    overridden = []
    if options.peak.tflops is not None:
        dtype = options.dtype
        peak.tflops = {**(peak.tflops or {}), dtype: float(options.peak.tflops)}
        overridden.append(f"run.peak.tflops for {dtype}")
    if options.peak.bandwidth_gbs is not None:
        peak.bandwidth_gbs = float(options.peak.bandwidth_gbs)
        overridden.append("run.peak.bandwidth_gbs")
    if overridden:
        peak.source += f"; overridden by {' and '.join(overridden)}"
    return peak


def _cpu_peak(name: str | None) -> Peak:
    features = cpu_features()
    ghz = cpu_ghz()
    threads = min(torch.get_num_threads(), os.cpu_count() or 1)
    isa = features.isa.upper()
    per_cycle = next((v for k, v in CPU_FP32_FLOPS_PER_CYCLE.items() if k in isa), CPU_FP32_FLOPS_PER_CYCLE["DEFAULT"])
    bf16_per_cycle = (
        CPU_BF16_FLOPS_PER_CYCLE["amx"]
        if features.amx
        else CPU_BF16_FLOPS_PER_CYCLE["avx512_bf16"]
        if features.bf16
        else per_cycle
    )
    fp32 = threads * ghz * per_cycle / 1000 if ghz else None
    bf16 = threads * ghz * bf16_per_cycle / 1000 if ghz else None
    return Peak(
        name=name,
        tflops={"float32": fp32, "bfloat16": bf16, "float16": None},
        bandwidth_gbs=measure_bandwidth(),
        source=(
            f"estimate: {threads} threads x {ghz or 0:.2f} GHz x {per_cycle} float32 FLOP/cycle ({features.isa})"
            f", {bf16_per_cycle} bfloat16; bandwidth measured by a 64 MiB copy"
        ),
    )


def measure_bandwidth(megabytes: int = 64, repeats: int = 5) -> float:
    """CPU memory bandwidth in GB/s: the median of copies of a buffer well past the caches (read + write)."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        samples.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(samples) / 1e9


# ------------------------------------------------------------------------------------------ bytes moved


class _Traffic(TorchDispatchMode):
    """Sums the bytes every operator reads and writes (a view moves nothing; an embedding reads only its rows)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view: no data moves
        written = sum(_nbytes(t) for t in tree_flatten(out)[0])
        if func is torch.ops.aten.embedding.default:
            read = written + _nbytes(args[1])  # the looked-up rows and the indices, not the whole table
        else:
            read = sum(_nbytes(t) for t in tree_flatten((args, kwargs))[0])
        self.bytes += read + written
        return out


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a forward reads: every parameter once, except embedding tables (gathered row by row)
    that no linear layer shares (a tied LM head reads the whole matrix)."""
    linear = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}
    gathered = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)} - linear
    seen, total = set(), 0
    for parameter in module.parameters():
        if id(parameter) in seen or id(parameter) in gathered:
            continue
        seen.add(id(parameter))
        total += _nbytes(parameter)
    for buffer in module.buffers():
        total += _nbytes(buffer)
    return total


def _main(value: Any) -> torch.Tensor | None:
    if isinstance(value, StageContext):
        return value.tokens if value.tokens is not None else value.pixel_values
    return value if isinstance(value, torch.Tensor) else None


def vision_bytes(vlm, ctx: StageContext, stop_at_unknown: bool = True) -> dict[str, dict | None]:
    """{stage: {bytes, bytes_unfused}} of the vision stages run on `ctx` (meta tensors: instant, or real ones).

    With `stop_at_unknown`, a stage whose token count depends on the image, and those after it, are left out."""
    declared = vlm.declared_layouts()
    result: dict[str, dict | None] = {}
    with torch.no_grad():
        for name, stage in vlm.vision_stages():
            if stop_at_unknown and declared[name] is None:
                break
            traffic = _Traffic()
            with traffic:
                out = stage(ctx)
            io = _nbytes(_main(ctx)) + _nbytes(_main(out))
            result[name] = {"bytes": weight_bytes(getattr(vlm, name)) + io, "bytes_unfused": traffic.bytes}
            ctx = out
    return result


def prefill_bytes(meta_vlm, batch_size: int, llm_input: int) -> dict[str, int]:
    """{bytes, bytes_unfused} of the prefill over `llm_input` positions, run on the meta-device VLM."""
    decoder = meta_vlm.decoder
    dtype = next((p.dtype for p in decoder.parameters() if p.is_floating_point()), torch.float32)
    embeds = torch.empty(batch_size, llm_input, decoder.hidden_size, dtype=dtype, device="meta")
    traffic = _Traffic()
    with torch.no_grad(), traffic:
        logits = decoder(embeds).logits
    return {"bytes": weight_bytes(decoder) + _nbytes(embeds) + _nbytes(logits), "bytes_unfused": traffic.bytes}


# ------------------------------------------------------------------------------------------- the block


def roofline(record: Record, traffic: dict[str, dict | None], peak: Peak, execution: Execution) -> Roofline:
    """The record's roofline block: the device's peak and, per stage and for TTFT, the figures and the floor."""
    used = execution.used.dtypes or {}
    requested = (execution.requested.dtypes if execution.requested else None) or {}
    eager_ms = execution.eager_ms or {}
    graphed = execution.stages or {}
    stages: dict[str, StageRoofline | None] = {}
    for stage in STAGES:
        component = STAGE_COMPONENT[stage]  # a component without weights computes in its input's dtype
        dtype = used.get(component) or requested.get(component) or "float32"
        stages[stage] = _figures(
            getattr(record.flops, stage),
            (traffic.get(stage) or {}).get("bytes"),
            (traffic.get(stage) or {}).get("bytes_unfused"),
            (peak.tflops or {}).get(dtype),
            peak.bandwidth_gbs,
            getattr(record.latency_ms, stage),
            eager_ms.get(stage) if graphed.get(stage) == "cudagraph" else None,
            dtype,
        )
    parts = [stages[s] for s in STAGES]
    total = {key: _sum(getattr(p, key) for p in parts) for key in ("flops", "bytes", "bytes_unfused", "floor_ms")}
    ttft = record.latency_ms.ttft
    whole_graph = str(execution.ttft or "").startswith("one CUDA graph")
    stages["ttft"] = StageRoofline(
        **total,
        intensity=_ratio(total["flops"], total["bytes"]),
        measured_ms=ttft,
        measured_over_floor=_ratio(ttft, total["floor_ms"]),
        **_launch(eager_ms.get("ttft") if whole_graph else None, ttft),
    )
    step = traffic.get("decode_step")
    if record.decode is not None and step:
        dtype = used.get("decoder") or requested.get("decoder") or "float32"
        tflops = (peak.tflops or {}).get(dtype)
        measured = record.decode.per_token_ms.median
        stages["decode_step"] = _figures(
            step["flops"], step["bytes"], None, tflops, peak.bandwidth_gbs, measured, None, dtype
        )
    return Roofline(peak=peak, launch_bound_ratio=LAUNCH_BOUND_RATIO, stages=stages)


def _figures(flops, nbytes, unfused, tflops, bandwidth, measured, eager, dtype) -> StageRoofline:
    compute_ms = None if flops is None or not tflops else flops / (tflops * 1e12) * 1e3
    memory_ms = None if nbytes is None or not bandwidth else nbytes / (bandwidth * 1e9) * 1e3
    known = [t for t in (compute_ms, memory_ms) if t is not None]
    floor = max(known) if known else None
    bound = None
    if compute_ms is not None and memory_ms is not None:
        bound = "compute" if compute_ms >= memory_ms else "memory"
    return StageRoofline(
        flops=flops,
        bytes=nbytes,
        bytes_unfused=unfused,
        dtype=dtype,
        peak_tflops=tflops,
        intensity=_ratio(flops, nbytes),
        floor_ms=floor,
        bound=bound,
        measured_ms=measured,
        measured_over_floor=_ratio(measured, floor),
        **_launch(eager, measured),
    )


def _launch(eager: float | None, graph: float | None) -> dict[str, Any]:
    ratio = _ratio(eager, graph)
    return {"eager_ms": eager, "launch_bound": None if ratio is None else ratio >= LAUNCH_BOUND_RATIO}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)
