"""One run: resolve, count (tokens, params, FLOPs), build, time every stage and TTFT; one record (`ablate.record`).

A run leaves the process as it found it (thread count, default dtype, the global RNG) and measures its own peak
memory, so many runs in one process (a grid, a Python loop) do not leak into each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ablate.components import DECODER_PRUNING, StageContext
from ablate.config import VLMConfig, load_config
from ablate.counting import check_fits, count_prefill_flops, count_vision, meta_context, token_summary, with_total
from ablate.errors import AblateError, ResourceError, out_of_memory, unexpected
from ablate.fidelity import first_token_fidelity
from ablate.model import VLM, build
from ablate.modes import empty_entry, prepare
from ablate.options import Progress, default_dtype
from ablate.preprocess import load_image, synthetic_image
from ablate.profiling import profile_stages, trace_path
from ablate.record import empty_record, environment, error_entry, image_entry, peak_memory, run_entry
from ablate.registry import KINDS, Registry, get_registry
from ablate.roofline import device_peak, prefill_bytes, roofline, vision_bytes
from ablate.timing import StageTimer, time_stages


def measure(
    config: str | VLMConfig | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    progress: Progress | None = None,
    registry: Registry | None = None,
    **run_options: Any,
) -> dict[str, Any]:
    """Build the configured VLM and measure it; returns the record (see `ablate.record`).

    `run_options` set the config's `run:` section and win over it, e.g. `measure("tiny", repeats=3, count_only=True)`.
    On failure this raises an AblateError (bad input: its message names the fix) whose `.record` holds everything
    measured before the failure, with `record["error"]` filled; KeyboardInterrupt carries `.record` the same way.
    """
    registry = registry or get_registry()
    progress = progress or (lambda *_: None)
    record = empty_record()
    where: dict[str, Any] = {"stage": "reading the config", "timer": None}
    try:
        with torch.random.fork_rng(devices=[]), _restore_threads():
            config = load_config(config, overrides, registry, run=run_options)
            _run(config, record, registry, progress, where)
        return record
    except BaseException as exc:  # every failure becomes a record; see the docstring
        timer = where["timer"]
        stage = f"{where['stage']} ({timer.current} stage)" if timer is not None and timer.current else where["stage"]
        if out_of_memory(exc):
            error = ResourceError(
                f"Out of memory while {stage}: {_one_line(exc)}. The weights fit, but not the activations: use a "
                f"smaller image size or batch, --dtype bfloat16, or --count-only (nothing allocated)."
            )
        elif isinstance(exc, (AblateError, KeyboardInterrupt)):
            error = exc
        else:
            error = _blamed(exc, stage, registry)
        record["error"] = error_entry(error, stage)
        error.record = record
        if error is exc:
            raise
        raise error from exc


def _run(config: VLMConfig, record: dict[str, Any], registry: Registry, progress: Progress, where: dict) -> None:
    options = config.run
    device = torch.device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)  # random weights are the same for the same seed
    record.update(
        name=config.name,
        prompt_tokens=config.prompt_tokens,
        batch_size=config.batch_size,
        config=config.to_dict(),
        run=run_entry(options),
        env=environment(device, registry.versions()),
        execution=empty_entry(options),
    )
    with peak_memory(device, record):
        where["stage"] = "reading the image"
        image = load_image(options.image) if options.image else None  # a bad file fails before any model is built
        if image is not None:  # the model is counted and built for the raw size of the image it will see
            config = dataclasses.replace(config, input_size=list(image.size))
            record["config"]["input_size"] = config.input_size

        where["stage"] = "counting on the meta device"
        progress("counting on the meta device", 0, 1)
        meta_vlm = build(config, meta=True, registry=registry)
        record["params"] = meta_vlm.params()
        record["encoder_form"] = getattr(meta_vlm.encoder, "form", None)
        meta_ctx = meta_context(meta_vlm, config.batch_size, config.prompt_tokens)
        flops, tokens, vision_out = count_vision(meta_vlm, meta_ctx)
        _fill_counts(record, meta_vlm, flops, tokens, config, vision_out)
        record["notes"].extend(note for kind in KINDS for note in getattr(meta_vlm, kind).notes())
        traffic = _traffic(meta_vlm, meta_ctx, record, config)
        peak = device_peak(device, options, record["env"]["device_name"])
        if options.count_only:
            _reducer_notes(record, meta_vlm, vision_out)
            record["roofline"] = roofline(record, traffic, peak, record["execution"])
            record["image"] = image_entry(options.image, image)
            record["notes"].append("count-only: nothing was timed and no weights were allocated.")
            if options.fidelity:
                record["notes"].append("count-only: fidelity needs a real run (run.fidelity was not measured).")
            if record["visual_tokens"] is None:
                record["notes"].append(
                    f"reducer '{config.reducer.name}' keeps a number of tokens that depends on the image: its "
                    f"token counts and the FLOPs from it on are known only from a timed run."
                )
            loaded = [
                f"{kind}.weights"
                for kind in ("encoder", "reducer", "connector", "decoder")
                if getattr(config, kind).weights
            ] + (["weights"] if config.weights else [])
            if loaded:
                record["notes"].append(
                    f"count-only: {', '.join(loaded)} exist but were not loaded or checked against the architecture."
                )
            return

        where["stage"] = "building the model"
        check_fits(meta_vlm, options)
        progress("building the model", 0, 1)
        vlm = build(config, registry=registry)
        record["weights"] = vlm.loaded_weights

        where["stage"] = "timing"
        if image is None:
            image = synthetic_image(vlm.encoder.input_size, options.seed)
        record["image"] = image_entry(options.image, image)
        with torch.inference_mode(), default_dtype(options.dtype_of("encoder")):
            pixels = vlm.encoder.prepare(image)
        pixels = pixels.unsqueeze(0).expand(config.batch_size, *pixels.shape).contiguous().to(device)
        ids = vlm.make_prompt(config.prompt_tokens, config.batch_size, options.seed).to(device)
        ctx = vlm.start(pixels, ids, image_size=image.size)
        where["stage"] = f"preparing {options.mode} mode"
        execution = prepare(vlm, ctx, options, progress)
        record["execution"] = execution.entry
        record["notes"] += execution.notes

        where["stage"] = "timing"
        timer = where["timer"] = StageTimer(device)
        latency, spread, vision_out = time_stages(
            execution, lambda: vlm.encoder.prepare(image).to(device), execution.ctx, options, timer, progress
        )
        record["latency_ms"], record["latency_spread_ms"] = latency, spread
        where["timer"] = None
        if options.profile:
            where["stage"] = "profiling"
            progress("profiling", 0, 1)
            path = trace_path(options.profile, config.name, record["execution"]["used"]["mode"])
            record["profile"] = profile_stages(execution, execution.ctx, path, device)
        if record["visual_tokens"] is None:  # image-dependent counts: take them from the real run
            where["stage"] = "counting the data-dependent stages"
            with torch.inference_mode():
                real_flops, real_tokens, vision_out = count_vision(vlm, ctx, stop_at_unknown=False)
            flops = {**real_flops, "encoder": flops["encoder"]}  # meta counts attention kernels; keep its figure
            _fill_counts(record, meta_vlm, flops, real_tokens, config, vision_out)
            with torch.inference_mode():
                traffic = {**traffic, **vision_bytes(vlm, execution.ctx, stop_at_unknown=False)}
            traffic.update(_traffic(meta_vlm, None, record, config))
            record["notes"].append(
                f"reducer '{config.reducer.name}' keeps a number of tokens that depends on the image: token counts "
                f"and the FLOPs from it on are those of the measured image."
            )
        _reducer_notes(record, meta_vlm, vision_out)
        record["roofline"] = roofline(record, traffic, peak, record["execution"])
        if options.fidelity:
            where["stage"] = "measuring fidelity against the model without its reducer"
            progress("measuring fidelity", 0, 1)
            record["fidelity"] = first_token_fidelity(vlm, execution.ctx)


def _fill_counts(record, meta_vlm: VLM, flops: dict, tokens: dict, config: VLMConfig, out: StageContext) -> None:
    summary = token_summary(meta_vlm, tokens, config.prompt_tokens)
    record["tokens"] = summary
    record["visual_tokens"] = None if summary["llm_input"] is None else summary["llm_input"] - config.prompt_tokens
    prefill = None
    if summary["llm_input"] is not None:
        pruning = out.extras.get(DECODER_PRUNING)
        visual = record["visual_tokens"]
        prefill = count_prefill_flops(meta_vlm, config.batch_size, summary["llm_input"], pruning, visual)
    record["flops"] = with_total({**flops, "prefill": prefill})


def _reducer_notes(record, vlm: VLM, out: StageContext) -> None:
    """Flag a reducer that leaves the LLM input as it is; give the per-layer counts of one that prunes in the LLM."""
    tokens, names = record["tokens"], [name for name, _ in vlm.vision_stages()]
    before = names[names.index("reducer") - 1]
    if vlm.reducer.passthrough or tokens["reducer"] is None or tokens["reducer"] != tokens[before]:
        return
    name, count = vlm.reducer.name, tokens["reducer"]
    pruning = out.extras.get(DECODER_PRUNING)
    if pruning is None:
        record["notes"].append(f"reducer '{name}' leaves the LLM input unchanged: {count} visual tokens in and out.")
        return
    layers = vlm.decoder.num_layers
    average = (pruning.layer * count + (layers - pruning.layer) * pruning.keep) / layers if layers else None
    record["notes"].append(
        f"reducer '{name}' leaves the LLM input unchanged ({count} visual tokens) and drops visual tokens inside the "
        f"LLM: layers 0..{pruning.layer - 1} see {count}, layers {pruning.layer}..{layers - 1} see {pruning.keep}"
        + (f" ({average:.1f} per layer on average, the count FastV and SparseVLM report)." if average else ".")
    )


def _traffic(meta_vlm: VLM, meta_ctx, record: dict[str, Any], config: VLMConfig) -> dict[str, Any]:
    """Bytes moved per stage, on the meta device: the vision stages on `meta_ctx` (None: skip them) and the prefill."""
    traffic = vision_bytes(meta_vlm, meta_ctx) if meta_ctx is not None else {}
    if record["tokens"]["llm_input"] is not None:
        traffic["prefill"] = prefill_bytes(meta_vlm, config.batch_size, record["tokens"]["llm_input"])
    return traffic


@contextmanager
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _blamed(exc: BaseException, stage: str, registry: Registry) -> AblateError:
    """An unexpected exception as a PluginFailure naming the plugin whose code raised it (or ablate's own)."""
    return unexpected(exc, stage, registry.plugin_in_traceback(exc))
