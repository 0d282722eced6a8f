"""One run: resolve, check the machine, count (tokens, params, FLOPs), build, time every stage and TTFT; one record.

A run leaves the process as it found it (thread count, default dtype, the global RNG) and measures its own peak
memory, so many runs in one process (a grid, a Python loop) do not leak into each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ablate.api.components import DECODER_PRUNING, DecoderPruning, StageContext
from ablate.api.errors import AblateError, PluginFailure, ResourceError, first_line, out_of_memory, unexpected
from ablate.api.hooks import KINDS
from ablate.api.preprocessing import load_image, synthetic_image
from ablate.api.registry import Registry, get_registry
from ablate.api.runtimes import TORCH_RUNTIME
from ablate.api.weights import meta_device
from ablate.config.compose import VLMConfig, load_config
from ablate.config.run_options import RunOptions
from ablate.measurement.counting import (
    check_fits,
    count_prefill_flops,
    count_vision,
    meta_context,
    token_summary,
    with_total,
)
from ablate.measurement.decoding import check_decodes, kv_cache, step_traffic, throughput, time_decode
from ablate.measurement.export import write_export
from ablate.measurement.fidelity import first_token_fidelity
from ablate.measurement.machine import check_machine, environment, peak_memory
from ablate.measurement.modes import prepare, requested
from ablate.measurement.profiling import profile_stages, trace_path
from ablate.measurement.quantization import check_available, logits_fidelity, quantize, stored_bytes
from ablate.measurement.quantization import notes as quantization_notes
from ablate.measurement.record import ErrorInfo, Flops, ImageInfo, LLMTokens, Params, Quantization, Record, Tokens
from ablate.measurement.roofline import device_peak, prefill_bytes, roofline, vision_bytes, weight_bytes
from ablate.measurement.timing import Progress, StageTimer, time_stages
from ablate.model.build import build, default_dtype
from ablate.model.vlm import STAGE_COMPONENT, VLM


def measure(
    config: str | VLMConfig | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    progress: Progress | None = None,
    registry: Registry | None = None,
    **run_options: Any,
) -> Record:
    """Build the configured VLM and measure it; returns the record (`ablate.Record`, `.to_dict()` for JSON).

    `run_options` set the config's `run:` section and win over it, e.g. `measure("tiny", repeats=3, count_only=True)`.
    On failure this raises an AblateError (bad input: its message names the fix) whose `.record` holds everything
    measured before the failure, with `record.error` filled; KeyboardInterrupt carries `.record` the same way.
    """
    registry = registry or get_registry()
    progress = progress or (lambda *_: None)
    return _recorded(config, overrides, registry, run_options, lambda *args: _run(*args, registry, progress))


def plan(
    config: str | VLMConfig | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    registry: Registry | None = None,
    **run_options: Any,
) -> Record:
    """What a run of `config` will be, in a fraction of a second and without looking at this machine: the model
    built on the meta device with its params, tokens and FLOPs (an image-dependent reducer at its upper bound),
    what ablate chose (`choices`) and the notes; nothing timed, nothing stored. Fails as `measure` does, so a plan
    names the exact error the run would meet. `ablate grid --dry-run` plans every cell."""
    registry = registry or get_registry()
    return _recorded(
        config, overrides, registry, {**run_options, "count_only": True}, lambda *args: _plan(*args, registry)
    )


def _recorded(config, overrides, registry: Registry, run_options: Mapping[str, Any], body) -> Record:
    """`body(config, record, where)` on the resolved config; every failure becomes the record's error (see measure)."""
    record = Record()
    where: dict[str, Any] = {"stage": "reading the config", "timer": None}
    try:
        with torch.random.fork_rng(devices=[]), _restore_threads():
            config = load_config(config, overrides, registry, run=run_options)
            body(config, record, where)
        return record
    except BaseException as exc:  # every failure becomes a record; see measure's docstring
        timer = where["timer"]
        stage = f"{where['stage']} ({timer.current} stage)" if timer is not None and timer.current else where["stage"]
        if out_of_memory(exc):
            error = ResourceError(
                f"Out of memory while {stage}: {first_line(exc)}. The weights fit, but not the activations: use a "
                f"smaller image size or batch, --dtype bfloat16, or --count-only (nothing allocated)."
            )
        elif isinstance(exc, (AblateError, KeyboardInterrupt)):
            error = exc
        else:
            error = unexpected(exc, stage, registry.plugin_in_traceback(exc))
        record.error = error_info(error, stage)
        error.record = record
        if error is exc:
            raise
        raise error from exc


def error_info(exc: BaseException, stage: str | None) -> ErrorInfo:
    """The record's error block for `exc`, raised while doing `stage`."""
    if isinstance(exc, KeyboardInterrupt):
        message = "Interrupted (Ctrl-C) before the run finished; what was measured so far is kept."
        return ErrorInfo(type="KeyboardInterrupt", message=message, stage=stage)
    failure = exc if isinstance(exc, PluginFailure) else None
    return ErrorInfo(
        type=type(exc).__name__ if isinstance(exc, AblateError) else f"unexpected {type(exc).__name__}",
        message=str(exc),
        stage=stage,
        plugin=failure.plugin if failure else None,
        log=failure.log if failure else None,
    )


def failed_record(exc: BaseException, stage: str | None = None) -> Record:
    """The record of a run that failed before it started (bad arguments): every field empty, the error filled."""
    return Record(error=error_info(exc, stage))


def run_entry(options: RunOptions) -> dict[str, Any]:
    """The run options as used: the thread count torch actually runs with, and each component's dtype."""
    used = dataclasses.asdict(options)
    used["threads"] = torch.get_num_threads()
    used["dtypes"] = {kind: str(options.dtype_of(kind)).removeprefix("torch.") for kind in used["dtypes"]}
    return used


def image_info(path: str | None, image) -> ImageInfo:
    info = ImageInfo(source="synthetic" if path is None else os.path.abspath(path))
    if image is not None:
        info.width, info.height = image.size
    if path is not None:
        info.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info


def _describe(config: VLMConfig, record: Record) -> None:
    record.name = config.name
    record.prompt_tokens = config.prompt_tokens
    record.batch_size = config.batch_size
    record.config = config.to_dict()
    record.execution = requested(config.run)


def _plan(config: VLMConfig, record: Record, where: dict, registry: Registry) -> None:
    _describe(config, record)
    if config.run.image:
        where["stage"] = "reading the image"
        config = dataclasses.replace(config, input_size=list(load_image(config.run.image).size))
    where["stage"] = "counting on the meta device"
    meta_vlm = build(config, meta=True, registry=registry)
    check_decodes(meta_vlm.decoder, config.run)
    _, _, vision_out = count_on_meta(record, meta_vlm, config)
    _count_only_notes(record, meta_vlm, vision_out, config)


def _run(config: VLMConfig, record: Record, where: dict, registry: Registry, progress: Progress) -> None:
    options = config.run
    _describe(config, record)
    where["stage"] = "checking the machine"
    check_machine(config)  # here, where the run happens: a grid resolved elsewhere fails cell by cell
    runtime = registry.runtime(options.runtime)
    if runtime is not None:
        runtime.check()  # its optional dependencies are installed here
    if not options.count_only:
        check_available(vars(options.quantize))  # torchao, for the schemes it applies
    device = torch.device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)  # random weights are the same for the same seed
    record.run = run_entry(options)
    record.env = environment(device, registry.versions())
    peak = device_peak(device, options, record.env.device_name)  # before the memory window: it copies 128 MiB
    with peak_memory(device, record, options.count_only):
        where["stage"] = "reading the image"
        image = load_image(options.image) if options.image else None  # a bad file fails before any model is built
        if image is not None:  # the model is counted and built for the raw size of the image it will see
            config = dataclasses.replace(config, input_size=list(image.size))
            record.config["input_size"] = config.input_size

        where["stage"] = "counting on the meta device"
        progress("counting on the meta device", 0, 1)
        meta_vlm = build(config, meta=True, registry=registry)
        check_decodes(meta_vlm.decoder, options)
        counted, meta_ctx, vision_out = count_on_meta(record, meta_vlm, config)
        traffic = _traffic(counted, meta_ctx, record, config)
        if options.count_only:
            _count_only_notes(record, meta_vlm, vision_out, config)
            record.roofline = roofline(record, traffic, peak, record.execution)
            record.image = image_info(options.image, image)
            return

        where["stage"] = "building the model"
        check_fits(meta_vlm, options)
        progress("building the model", 0, 1)
        vlm = build(config, registry=registry)
        record.weights = vlm.loaded_weights

        where["stage"] = "timing"
        if image is None:
            image = synthetic_image(vlm.encoder.input_size, options.seed)
        record.image = image_info(options.image, image)
        with torch.inference_mode(), default_dtype(options.dtype_of("encoder")):
            pixels = vlm.encoder.prepare(image)
        pixels = pixels.unsqueeze(0).expand(config.batch_size, *pixels.shape).contiguous().to(device)
        ids = vlm.make_prompt(config.prompt_tokens, config.batch_size, options.seed).to(device)
        ctx = vlm.start(pixels, ids, image_size=image.size)
        schemes = {kind: scheme for kind, scheme in vars(options.quantize).items() if scheme}
        if schemes:
            where["stage"] = "quantizing"
            float_logits, float_bytes = _before_quantizing(vlm, ctx, schemes, runtime is None)
        where["stage"] = f"preparing {options.mode} mode" if runtime is None else f"preparing runtime {runtime.name}"
        prepared = prepare(vlm, ctx, options, progress, runtime)
        record.execution = prepared.entry
        record.notes += prepared.notes
        if schemes:
            record.quantization = _quantization(vlm, prepared, schemes, float_logits, float_bytes)
            record.notes += quantization_notes(_quantized_in_torch(schemes, record.execution))
        if options.export:
            where["stage"] = "exporting the prepared stages"
            record.notes.append(write_export(options.export, record, prepared))

        where["stage"] = "timing"
        timer = where["timer"] = StageTimer(device)
        timed = time_stages(
            prepared, lambda: vlm.encoder.prepare(image).to(device), prepared.ctx, options, timer, progress
        )
        record.latency_ms, record.latency_spread_ms, record.latency_min_ms = timed.median, timed.spread, timed.minimum
        record.timing, vision_out = timed.timing, timed.vision_out
        where["timer"] = None
        if options.profile:
            where["stage"] = "profiling"
            progress("profiling", 0, 1)
            path = trace_path(options.profile, config.name, record.execution.used.mode)
            record.profile = profile_stages(prepared, prepared.ctx, path, device)
        if record.visual_tokens is None:  # image-dependent counts: take them from the real run
            where["stage"] = "counting the data-dependent stages"
            with torch.inference_mode():
                real_flops, real_tokens, vision_out = count_vision(vlm, ctx, stop_at_unknown=False)
            flops = {**real_flops, "encoder": record.flops.encoder}  # meta counts attention kernels; keep its figure
            _fill_counts(record, meta_vlm, flops, real_tokens, config, vision_out)
            record.count_basis = "measured image"
            with torch.inference_mode():
                traffic = {**traffic, **vision_bytes(vlm, prepared.ctx, stop_at_unknown=False)}
            traffic.update(_traffic(meta_vlm, None, record, config))
            record.notes.append(
                f"reducer '{config.reducer.name}' keeps a number of tokens that depends on the image: token counts "
                f"and the FLOPs from it on are those of the measured image."
            )
            if not record.weights:
                record.notes.append(
                    f"reducer '{config.reducer.name}' kept {record.tokens.reducer} of {_tokens_before_reducer(record)} "
                    f"tokens on random weights: a count decided by random attention or features says nothing about "
                    f"what trained weights keep. Load trained weights for a count that means something."
                )
        _reducer_notes(record, meta_vlm, vision_out)
        if options.max_new_tokens:
            where["stage"] = "timing the decode"
            record.decode, measured, fallback = time_decode(
                vlm, prepared, options, device, progress, record.latency_ms.ttft
            )
            if record.kv_cache is not None:
                record.kv_cache.measured_bytes = measured
            # the float model's weights (the meta one's): a quantized run's are adjusted below, with the prefill's
            traffic["decode_step"] = step_traffic(weight_bytes(meta_vlm.decoder), record.kv_cache, record.decode)
            if fallback is not None:
                record.execution.fallbacks.append(fallback)
                record.notes.append(f"fallback: {fallback}")
        record.throughput = throughput(record)
        if record.quantization is not None:
            traffic = _quantized_traffic(traffic, record.quantization)
        record.roofline = roofline(record, traffic, peak, record.execution)
        if options.fidelity:
            where["stage"] = "measuring fidelity against the model without its reducer"
            progress("measuring fidelity", 0, 1)
            record.fidelity = first_token_fidelity(vlm, prepared.ctx)


STAGE_OF = {kind: stage for stage, kind in STAGE_COMPONENT.items()}  # component -> the stage that runs it


def _before_quantizing(vlm: VLM, ctx: StageContext, schemes: dict[str, str], in_torch: bool):
    """The float model's first-token logits and stored bytes per quantized component; then, in the torch runtime,
    the quantization itself (another runtime applies its own as it prepares each stage)."""
    with torch.inference_mode():
        logits = vlm.prefill_stage(vlm.run_vision(ctx))
    float_bytes = {kind: stored_bytes(getattr(vlm, kind)) for kind in schemes}
    if in_torch:
        for kind, scheme in schemes.items():
            quantize(getattr(vlm, kind), scheme)
    return logits, float_bytes


def _quantized_in_torch(schemes: dict[str, str], execution) -> dict[str, str]:
    """The schemes torch applied: all of them in the torch runtime, else those of the stages that fell back."""
    ran_in = execution.runtimes or {}
    return {
        kind: scheme for kind, scheme in schemes.items() if ran_in.get(STAGE_OF[kind], TORCH_RUNTIME) == TORCH_RUNTIME
    }


def _quantized_traffic(traffic: dict[str, Any], quantization: Quantization) -> dict[str, Any]:
    """The stages' least bytes with each quantized component's weights read as stored, not as float32: the floor
    of a quantized run is that of the bytes it must read."""
    adjusted = dict(traffic)
    for kind, before in quantization.float_bytes.items():
        saved = before - quantization.quantized_bytes[kind]
        for stage in (STAGE_OF[kind], "decode_step") if kind == "decoder" else (STAGE_OF[kind],):
            if adjusted.get(stage) is not None:
                adjusted[stage] = {**adjusted[stage], "bytes": max(adjusted[stage]["bytes"] - saved, 0)}
    return adjusted


def _quantization(vlm: VLM, prepared, schemes: dict[str, str], float_logits, float_bytes) -> Quantization:
    """The record's quantization block: bytes as each component ran (the runtime's figure for its stages)."""
    held = {kind: prepared.weight_bytes.get(STAGE_OF[kind]) for kind in schemes}
    with torch.inference_mode():
        logits = prepared.ttft(prepared.ctx)
    return Quantization(
        schemes=dict(schemes),
        float_bytes=float_bytes,
        quantized_bytes={kind: held[kind] or stored_bytes(getattr(vlm, kind)) for kind in schemes},
        fidelity=logits_fidelity(float_logits, logits),
    )


def count_on_meta(record: Record, meta_vlm: VLM, config: VLMConfig) -> tuple[VLM, StageContext, StageContext]:
    """Params, tokens and FLOPs of the meta-device VLM into `record`, with what `build` chose and the components'
    notes. A reducer that decides by the image is counted at its upper bound when it states one (run.count_only: no
    image to decide by) and left unknown otherwise. Returns the VLM counted, its meta input and the vision output."""
    record.params = Params(**meta_vlm.params())
    record.encoder_form = getattr(meta_vlm.encoder, "form", None)
    record.choices = dict(meta_vlm.choices)
    record.notes.extend(meta_vlm.choice_notes)
    record.notes.extend(note for kind in KINDS for note in getattr(meta_vlm, kind).notes())
    counted = meta_vlm
    if config.run.count_only and meta_vlm.num_visual_tokens() is None:
        counted = upper_bound_vlm(meta_vlm) or meta_vlm
    meta_ctx = meta_context(counted, config.batch_size, config.prompt_tokens)
    flops, tokens, vision_out = count_vision(counted, meta_ctx)
    _fill_counts(record, counted, flops, tokens, config, vision_out)
    if record.visual_tokens is not None:
        record.count_basis = "config" if counted is meta_vlm else "upper bound"
    return counted, meta_ctx, vision_out


def upper_bound_vlm(meta_vlm: VLM) -> VLM | None:
    """The meta VLM with its image-dependent reducer replaced by the reducer's upper-bound stand-in, or None."""
    reducer = meta_vlm.reducer
    with meta_device():
        stand_in = reducer.at_upper_bound(reducer.input_layout(meta_vlm.encoder, meta_vlm.connector))
    if stand_in is None:
        return None
    return VLM(meta_vlm.config, meta_vlm.encoder, stand_in, meta_vlm.connector, meta_vlm.decoder)


def _tokens_before_reducer(record: Record) -> int | None:
    names = ["encoder", "connector"] if record.config["reducer"].get("position") == "after_connector" else ["encoder"]
    return getattr(record.tokens, names[-1])


def _fill_counts(
    record: Record, meta_vlm: VLM, flops: dict, tokens: dict, config: VLMConfig, out: StageContext
) -> None:
    summary = token_summary(meta_vlm, tokens, config.prompt_tokens)
    record.tokens = Tokens(**summary)
    record.visual_tokens = None if summary["llm_input"] is None else summary["llm_input"] - config.prompt_tokens
    prefill, pruning = None, out.extras.get(DECODER_PRUNING)
    if summary["llm_input"] is not None:
        prefill = count_prefill_flops(meta_vlm, config.batch_size, summary["llm_input"], pruning, record.visual_tokens)
    record.flops = Flops(**with_total({**flops, "prefill": prefill}))
    record.llm_tokens = llm_tokens(meta_vlm.decoder.num_layers, record.visual_tokens, config.prompt_tokens, pruning)
    record.kv_cache = kv_cache(
        meta_vlm.decoder,
        config.run.dtype_of("decoder"),
        config.batch_size,
        summary["llm_input"],
        record.visual_tokens,
        pruning,
        config.run.max_new_tokens,
    )


def llm_tokens(layers: int, visual: int | None, prompt: int, pruning: DecoderPruning | None) -> LLMTokens:
    """Visual tokens per LLM layer (an in-LLM reducer's drop after its layer included) and the KV cache they leave."""
    if not layers or visual is None:
        return LLMTokens()
    per_layer = (
        [visual] * layers if pruning is None else [visual] * pruning.layer + [pruning.keep] * (layers - pruning.layer)
    )
    return LLMTokens(per_layer, sum(per_layer) / layers, sum(per_layer) + prompt * layers)


def _count_only_notes(record: Record, meta_vlm: VLM, vision_out: StageContext, config: VLMConfig) -> None:
    _reducer_notes(record, meta_vlm, vision_out)
    record.notes.append("count-only: nothing was timed and no weights were allocated.")
    if config.run.fidelity:
        record.notes.append("count-only: fidelity needs a real run (run.fidelity was not measured).")
    if record.count_basis == "upper bound":
        record.notes.append(
            f"reducer '{config.reducer.name}' keeps a number of tokens that depends on the image: without one "
            f"(count-only) the counts are its upper bound, at most {record.visual_tokens} visual tokens, and the "
            f"FLOPs from it on are those at that bound; a timed run counts the measured image."
        )
    elif record.visual_tokens is None:
        record.notes.append(
            f"reducer '{config.reducer.name}' keeps a number of tokens that depends on the image: its token counts "
            f"and the FLOPs from it on are known only from a timed run."
        )
    loaded = [f"{kind}.weights" for kind in KINDS if getattr(config, kind).weights] + (
        ["weights"] if config.weights else []
    )
    if loaded:
        record.notes.append(
            f"count-only: {', '.join(loaded)} exist but were not loaded or checked against the architecture."
        )


def _reducer_notes(record: Record, vlm: VLM, out: StageContext) -> None:
    """Flag a reducer that leaves the LLM input as it is; give the per-layer counts of one that prunes in the LLM."""
    names = [name for name, _ in vlm.vision_stages()]
    before = names[names.index("reducer") - 1]
    count = record.tokens.reducer
    if vlm.reducer.passthrough or count is None or count != getattr(record.tokens, before):
        return
    name = vlm.reducer.name
    pruning = out.extras.get(DECODER_PRUNING)
    if pruning is None:
        record.notes.append(f"reducer '{name}' leaves the LLM input unchanged: {count} visual tokens in and out.")
        return
    layers = vlm.decoder.num_layers
    average = (pruning.layer * count + (layers - pruning.layer) * pruning.keep) / layers if layers else None
    record.notes.append(
        f"reducer '{name}' leaves the LLM input unchanged ({count} visual tokens) and drops visual tokens inside the "
        f"LLM: layers 0..{pruning.layer - 1} see {count}, layers {pruning.layer}..{layers - 1} see {pruning.keep}"
        + (f" ({average:.1f} per layer on average, the count FastV and SparseVLM report)." if average else ".")
    )


def _traffic(meta_vlm: VLM, meta_ctx, record: Record, config: VLMConfig) -> dict[str, Any]:
    """Bytes moved per stage, on the meta device: the vision stages on `meta_ctx` (None: skip them) and the prefill."""
    traffic = vision_bytes(meta_vlm, meta_ctx) if meta_ctx is not None else {}
    if record.tokens.llm_input is not None:
        traffic["prefill"] = prefill_bytes(meta_vlm, config.batch_size, record.tokens.llm_input)
    return traffic


@contextmanager
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
