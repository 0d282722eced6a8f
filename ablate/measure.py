"""One `ablate run`: build, count (tokens, params, FLOPs), time every stage and TTFT, return one record.

The record is a plain, versioned dict (RESULT_SCHEMA_VERSION) so that grids, stores and trackers can keep it.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ablate.config import VLMConfig, load_config
from ablate.errors import ConfigError, ResourceError
from ablate.model import VLM, build
from ablate.preprocess import load_image, preprocess, synthetic_image
from ablate.timing import StageTimer, spread

RESULT_SCHEMA_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("eager",)  # torch.compile and CUDA graphs come with the performance-modes work
STAGES = ("encoder", "reducer", "connector", "prefill")
# Progress callback: (what is happening, step done, steps in all).
Progress = Callable[[str, int, int], None]


@dataclass
class RunOptions:
    warmup: int = 2
    repeats: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    mode: str = "eager"
    count_only: bool = False
    image: str | None = None  # a real image file; default: a synthetic one of the encoder's size
    seed: int = 0

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"Unknown --dtype '{self.dtype}'. Choose one of: {', '.join(DTYPES)}.")
        if self.mode not in MODES:
            raise ConfigError(f"Unknown --mode '{self.mode}'. Available modes: {', '.join(MODES)}.")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError("--repeats must be >= 1 and --warmup >= 0.")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"Unknown --device '{self.device}'. Use cpu, cuda or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU here. Use --device cpu.")


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in the target dtype: a 7B model never exists in float32 first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------- counting


def count_flops(vlm: VLM, batch_size: int, prompt_tokens: int) -> tuple[dict[str, int | None], int | None]:
    """FLOPs per stage on a meta-device model, and the visual token count that came out.

    Meta tensors count every matmul, attention included (on real CPU tensors FlopCounterMode misses the fused
    attention kernel). A stage whose output size depends on the data (adaptive pruning) cannot run on meta:
    it and the stages after it are left as None.
    """
    size = vlm.config.encoder.image_size
    flops: dict[str, int | None] = dict.fromkeys(STAGES)
    out: Any = torch.empty(batch_size, 3, size, size, device="meta")
    visual_tokens = None
    try:
        with torch.no_grad():
            for name, stage in vlm.stages():
                with FlopCounterMode(display=False) as counter:
                    out = stage(out)
                flops[name] = counter.get_total_flops()
            visual_tokens = out.tokens.shape[1]
            flops["prefill"] = count_prefill_flops(vlm, batch_size, visual_tokens + prompt_tokens)
    except (RuntimeError, NotImplementedError):  # data-dependent stage on meta; see docstring
        pass
    return with_total(flops), visual_tokens


def count_prefill_flops(vlm: VLM, batch_size: int, tokens: int) -> int:
    embeds = torch.empty(batch_size, tokens, vlm.decoder.hidden_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vlm.decoder(embeds)
    return counter.get_total_flops()


def with_total(flops: dict[str, int | None]) -> dict[str, int | None]:
    stages = {key: flops[key] for key in STAGES}
    total = sum(stages.values()) if all(v is not None for v in stages.values()) else None
    return {**stages, "total": total}


def param_bytes(vlm: VLM, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in vlm.parameters()) * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(vlm: VLM, options: RunOptions) -> None:
    """Refuse a run whose weights alone (plus a working margin) would not fit, before allocating them."""
    device = torch.device(options.device)
    needed = int(param_bytes(vlm, DTYPES[options.dtype]) * 1.2)
    available = available_memory(device)
    if available is not None and needed > available:
        smaller = " or --dtype bfloat16 (half the memory)" if options.dtype == "float32" else ""
        raise ResourceError(
            f"This configuration needs about {needed / 2**30:.1f} GiB for its weights in {options.dtype} on "
            f"{device}, but only {available / 2**30:.1f} GiB is available. Use --count-only to get tokens, "
            f"parameters and FLOPs without allocating weights{smaller}, or pick a smaller model."
        )


# ---------------------------------------------------------------------------------------------- the run


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(options: RunOptions) -> dict[str, Any]:
    import timm
    import transformers

    device = torch.device(options.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "dtype": options.dtype,
        "mode": options.mode,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident memory (kilobytes on Linux), weights and activations together.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def empty_record(config: VLMConfig | None, options: RunOptions) -> dict[str, Any]:
    keys = ("preprocess",) + STAGES + ("stage_sum", "ttft")
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "name": config.name if config else None,
        "visual_tokens": None,
        "prompt_tokens": config.prompt_tokens if config else None,
        "batch_size": config.batch_size if config else None,
        "params": None,
        "flops": None,
        "latency_ms": dict.fromkeys(keys),
        "latency_spread_ms": dict.fromkeys(keys),
        "warmup": options.warmup,
        "repeats": options.repeats,
        "count_only": options.count_only,
        "encoder_form": None,
        "peak_memory_mb": None,
        "env": None,
        "config": config.to_dict() if config else None,
        "error": None,
    }


def measure(
    config: str | VLMConfig | dict,
    overrides=(),
    options: RunOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the configured VLM and measure it. Raises AblateError for bad input (see `measure_record`)."""
    options = options or RunOptions()
    options.validate()
    config = load_config(config, overrides)
    progress = progress or (lambda *_: None)
    if options.threads:
        torch.set_num_threads(options.threads)
    dtype = DTYPES[options.dtype]
    device = torch.device(options.device)
    record = empty_record(config, options)
    record["env"] = environment(options)
    image = load_image(options.image) if options.image else None  # a bad path fails before any model is built

    progress("counting on the meta device", 0, 1)
    with default_dtype(dtype):
        meta_vlm = build(config, meta=True)
    record["config"] = config.to_dict()  # again: components may resolve defaults (e.g. timm's native size)
    record["params"] = meta_vlm.params()
    record["flops"], record["visual_tokens"] = count_flops(meta_vlm, config.batch_size, config.prompt_tokens)
    record["encoder_form"] = getattr(meta_vlm.encoder, "form", None)
    if options.count_only:
        record["peak_memory_mb"] = peak_memory_mb(device)
        return record

    check_fits(meta_vlm, options)
    progress("building the model", 0, 1)
    with default_dtype(dtype):
        vlm = build(config, device=device)
    record["latency_ms"], record["latency_spread_ms"], record["visual_tokens"] = time_stages(
        vlm, config, options, image, progress
    )
    if record["flops"]["prefill"] is None:  # adaptive reducer: the real run told us the token count
        total_tokens = record["visual_tokens"] + config.prompt_tokens
        record["flops"] = with_total({**record["flops"], "prefill": count_prefill_flops(meta_vlm, config.batch_size, total_tokens)})
    record["peak_memory_mb"] = peak_memory_mb(device)
    return record


def time_stages(vlm: VLM, config: VLMConfig, options: RunOptions, image, progress: Progress):
    device = torch.device(options.device)
    spec = vlm.encoder.preprocessing
    if image is None:
        image = synthetic_image(spec.image_size, options.seed)
    pixels = preprocess(image, spec).unsqueeze(0).expand(config.batch_size, -1, -1, -1).contiguous().to(device)
    input_ids = vlm.make_prompt(config.prompt_tokens, config.batch_size, options.seed).to(device)
    timer = StageTimer(device)
    total = options.warmup + options.repeats
    visual_tokens = None
    with torch.inference_mode():
        for step in range(total):
            progress("warming up" if step < options.warmup else "timing", step, total)
            timer.recording = step >= options.warmup
            timer("preprocess", lambda: preprocess(image, spec).to(device))
            # The whole TTFT as one call and the stages one by one, in the same repeat so both see the same
            # machine state; which goes first alternates, so slow drift (clocks, caches) hits both alike.
            if step % 2:
                timer("ttft", vlm.prefill, pixels, input_ids)
            out: Any = pixels
            for name, stage in vlm.stages():
                out = timer(name, stage, out)
            timer("prefill", vlm.prefill_with, out.tokens, input_ids)
            visual_tokens = out.tokens.shape[1]
            if not step % 2:
                timer("ttft", vlm.prefill, pixels, input_ids)
        progress("done", total, total)
    samples = timer.samples
    samples["stage_sum"] = [sum(parts) for parts in zip(*(samples[name] for name in STAGES))]
    keys = ("preprocess",) + STAGES + ("stage_sum", "ttft")
    return (
        {key: statistics.median(samples[key]) for key in keys},
        {key: spread(samples[key]) for key in keys},
        visual_tokens,
    )
