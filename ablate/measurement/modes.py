"""Execution modes: how the timed stages run, and what the record says about it.

    eager      the VLM's stage methods as they are; nothing is changed or added (the default, and the reference).
    compile    each stage compiled with torch.compile (static shapes; on the CPU with inductor's freezing, which
               folds the weights into the graph, prepacks them for oneDNN and fuses convolutions with their
               activations). A stage that fails to compile runs eagerly and the record says so.
    cudagraph  (CUDA only) each stage captured in a CUDA graph and replayed, and the whole TTFT path as one more
               graph when every stage has static shapes. A stage that synchronizes with the host (a reducer whose
               token count depends on the image) runs eagerly between the graphs of the others, and the record says
               that TTFT was not one graph. Without a CUDA GPU it falls back to compile, the nearest mode.

`memory_format=channels_last` converts the encoder's convolution weights and the pixels to NHWC (oneDNN and cuDNN
run convolutions fastest that way; with bfloat16 weights on a CPU it is the difference between 1.5x and 3x).

Outside eager mode the stages run once eagerly first, as the reference: the record gives each stage's output
deviation from it (accumulated along the path, as TTFT sees it), so a mode that changes the numbers says by how
much. On a GPU the eager stages are also timed, so that a launch-bound stage (eager far slower than its graph) is
flagged in the roofline block.

These are the modes of the `torch` runtime, ablate's own. Under another runtime (`run.runtime`, a plugin's
`ablate.api.Runtime`) each stage is handed to it instead, on the input its previous stages gave; a stage it refuses
(StageFallback) runs here eagerly, labelled, and every stage's deviation from the float eager pass is recorded.

What ran is the record's `execution` block (`ablate.measurement.record.Execution`, each field described there).

torch.compile starts afresh in every compile-mode run (torch._dynamo.reset), which drops any other compiled code
in the process: compile what you compare after preparing the toolkit's run, as benchmarks/toolkit_overhead.py does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ablate.api.components import StageContext
from ablate.api.errors import first_line
from ablate.api.hooks import KINDS
from ablate.api.runtimes import TORCH_RUNTIME, Runtime, RuntimeStage, StageFallback, tensor_names, tensors_of
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import cpu_features
from ablate.measurement.quantization import quantize
from ablate.measurement.record import Execution, ModeChoice
from ablate.measurement.timing import Progress, StageTimer
from ablate.model.vlm import STAGE_COMPONENT

GRAPH_WARMUP = 3  # eager calls on a side stream before capture (cuBLAS/cuDNN workspaces, lazy initialisation)


@dataclass
class Prepared:
    """What the timing loop calls: the stages in order (each takes the previous one's output), and the whole TTFT."""

    stages: list[tuple[str, Callable[[Any], Any]]]
    ttft: Callable[[StageContext], torch.Tensor]
    ctx: StageContext  # the first stage's input (pixels in the chosen memory format)
    entry: Execution  # the record's execution block
    notes: list[str] = field(default_factory=list)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # stage -> its weights' bytes, as a runtime held them
    files: dict[str, Any] = field(default_factory=dict)  # stage -> the file a runtime loaded it from (Path)
    signatures: dict[str, Any] = field(default_factory=dict)  # stage -> its tensors: name, shape, dtype (tensor_specs)


def prepare(
    vlm,
    ctx: StageContext,
    options: RunOptions,
    progress: Progress | None = None,
    runtime: type[Runtime] | None = None,
) -> Prepared:
    """Set the VLM up for `options.mode` and `options.memory_format`; compile or capture what the mode needs. With a
    `runtime` (run.runtime's class; None: torch), hand each stage to it instead (see `_in_runtime`)."""
    progress = progress or (lambda *_: None)
    device = ctx.pixel_values.device
    entry = requested(options)
    entry.cpu = cpu_features() if device.type == "cpu" else None
    entry.timer = "cuda-events" if device.type == "cuda" else "perf_counter"
    notes: list[str] = []

    mode = options.mode
    if mode == "cudagraph" and device.type != "cuda":
        mode = "compile"
        _fall_back(
            entry,
            notes,
            f"mode cudagraph needs a CUDA GPU (the device is {device.type}): ran in compile mode, the nearest one "
            f"(it too removes per-operator overhead).",
        )
    ctx = _apply_memory_format(vlm, ctx, options.memory_format, entry, notes)
    entry.used.dtypes = {kind: _dtype_name(param_dtype(getattr(vlm, kind))) for kind in KINDS}
    if entry.cpu and not entry.cpu.bf16 and torch.bfloat16 in _param_dtypes(vlm):
        notes.append(
            f"this CPU ({entry.cpu.isa}) has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 math is "
            f"emulated here and usually slower than float32; the bfloat16 speed-ups seen on other CPUs do not apply."
        )

    if runtime is not None:
        start = time.perf_counter()
        with torch.inference_mode():
            stages, ttft, used, signatures = _in_runtime(runtime, vlm, ctx, entry, notes, options, progress)
        entry.setup_s = time.perf_counter() - start
        ran = set(entry.runtimes.values()) - {"no-op"}
        entry.used.runtime = runtime.name if ran <= {runtime.name} else "mixed"
        entry.used.mode = "eager" if TORCH_RUNTIME in ran else None
        return Prepared(stages, ttft, ctx, entry, notes, dict(used.weight_bytes), dict(used.files), signatures)
    entry.used.runtime = TORCH_RUNTIME
    entry.runtimes = {name: TORCH_RUNTIME for name, _ in vlm.stages()}
    if mode == "eager":
        entry.used.mode = "eager"
        entry.stages = {name: "eager" for name, _ in vlm.stages()}
        entry.ttft = "eager: one call of the stage methods"
        return Prepared(vlm.stages(), lambda c: vlm.prefill_stage(vlm.run_vision(c)), ctx, entry, notes)

    with torch.inference_mode():
        progress("running eagerly once (the reference)", 0, 1)
        reference = _run_stages(_static_stages(vlm, ctx, notes), ctx)
        if device.type == "cuda":
            entry.eager_ms = _time_eager(vlm, ctx, options.repeats, device)
        start = time.perf_counter()
        if mode == "compile":
            stages, ttft = _compile(vlm, ctx, reference, entry, notes, device, progress)
        else:
            stages, ttft = _capture(vlm, ctx, reference, entry, notes, device, progress)
        entry.setup_s = time.perf_counter() - start
    used = set(entry.stages.values()) - {"no-op"}
    entry.used.mode = mode if used <= {mode} else "mixed"
    return Prepared(stages, ttft, ctx, entry, notes)


def requested(options: RunOptions) -> Execution:
    """The record's execution block as the run options ask for it, before anything ran."""
    choice = ModeChoice(
        runtime=options.runtime,
        mode=options.mode,
        dtypes={kind: _dtype_name(options.dtype_of(kind)) for kind in KINDS},
        memory_format=options.memory_format,
    )
    return Execution(requested=choice)


# --------------------------------------------------------------------------------------------- internals


def _fall_back(entry: Execution, notes: list[str], sentence: str) -> None:
    entry.fallbacks.append(sentence)
    notes.append(f"fallback: {sentence}")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def param_dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _param_dtypes(vlm) -> set[torch.dtype]:
    return {p.dtype for p in vlm.parameters() if p.is_floating_point()}


def _apply_memory_format(
    vlm, ctx: StageContext, memory_format: str, entry: Execution, notes: list[str]
) -> StageContext:
    entry.used.memory_format = "contiguous"
    if memory_format == "contiguous":
        return ctx
    if not any(p.dim() == 4 for p in vlm.encoder.parameters()):
        _fall_back(
            entry,
            notes,
            f"memory format channels_last: encoder '{vlm.encoder.name}' has no convolutions; kept contiguous.",
        )
        return ctx
    if ctx.pixel_values.dim() != 4:
        _fall_back(
            entry,
            notes,
            f"memory format channels_last: encoder '{vlm.encoder.name}' takes {ctx.pixel_values.dim()}-D pixels "
            f"(not one NCHW batch); kept contiguous.",
        )
        return ctx
    vlm.encoder.to(memory_format=torch.channels_last)  # 4-D weights only; the rest is untouched
    entry.used.memory_format = "channels_last"
    return replace(ctx, pixel_values=ctx.pixel_values.contiguous(memory_format=torch.channels_last))


def _static_stages(vlm, ctx: StageContext, notes: list[str]) -> list[tuple[str, Callable]]:
    """The stages with a prefill that splices at a known position, so that it never waits for the GPU."""
    stages = vlm.vision_stages()
    position = vlm.image_position(ctx.input_ids)
    if position is None:
        notes.append(
            "the image placeholder sits at different positions in the batch's prompts: the prefill splices row by "
            "row, which synchronizes with the device (it cannot be captured in a graph)."
        )
        return stages + [("prefill", vlm.prefill_stage)]

    def prefill(c: StageContext) -> torch.Tensor:
        embeds, _, _ = vlm.splice(c.tokens, c.input_ids, c.text_embeds, position=position)
        return vlm.decoder(embeds).logits

    return stages + [("prefill", prefill)]


def _run_stages(stages, ctx: StageContext) -> dict[str, Any]:
    outputs, out = {}, ctx
    for name, stage in stages:
        out = outputs[name] = stage(out)
    return outputs


def _main_tensor(out: Any) -> torch.Tensor:
    return out.tokens if isinstance(out, StageContext) else out


def deviation(out: Any, reference: Any) -> float | None:
    """max |out - reference| / max |reference| of a stage's main output (tokens, or logits); None if shapes differ."""
    a, b = _main_tensor(out), _main_tensor(reference)
    if a is None or b is None or a.shape != b.shape:
        return None
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / (scale or 1.0)


def _time_eager(vlm, ctx: StageContext, repeats: int, device: torch.device) -> dict[str, float]:
    """Median eager ms per stage and of one-call TTFT (GPU only: what a graph saves is the launch overhead)."""
    timer = StageTimer(device)
    for step in range(repeats + 1):
        timer.recording = step > 0
        out: Any = ctx
        for name, stage in vlm.stages():
            out = timer(name, stage, out)
        timer("ttft", lambda: vlm.prefill_stage(vlm.run_vision(ctx)))
    return {name: statistics.median(samples) for name, samples in timer.samples.items()}


# ---------------------------------------------------------------------------------------------- compile


def inductor_settings(device: torch.device):
    """Freezing (CPU): weights become constants that inductor folds and prepacks for oneDNN, and convolutions fuse
    with their activations. It is read when a graph compiles, i.e. at the first call, so it wraps that call."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=device.type == "cpu")


def _compile(vlm, ctx, reference, entry, notes, device, progress):
    # Every run compiles afresh: with freezing, dynamo guards on each weight's identity, so earlier runs' models would
    # count against its recompile limit, past which it silently runs eagerly. This drops other compiled code too.
    torch._dynamo.reset()
    stages = []
    entry.stages, entry.graph_breaks, entry.deviation_from_eager = {}, {}, {}
    out: Any = ctx
    plain = _static_stages(vlm, ctx, [])
    for index, (name, stage) in enumerate(plain):
        progress(f"compiling the {name} stage", index, len(plain))
        compiled = torch.compile(stage, dynamic=False)
        breaks = _graph_break_count()
        try:
            with inductor_settings(device):
                result = compiled(out)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run this stage eagerly, and say why
            result = stage(out)  # an eager failure is the plugin's bug and propagates as such
            compiled = stage
            _fall_back(
                entry, notes, f"the {name} stage failed to compile ({first_line(exc, with_type=True)}): it ran eagerly."
            )
        entry.stages[name] = "compile" if compiled is not stage else "eager"
        entry.graph_breaks[name] = _graph_break_count() - breaks
        entry.deviation_from_eager[name] = deviation(result, reference[name])
        stages.append((name, compiled))
        out = result
    breaks = {name: count for name, count in entry.graph_breaks.items() if count}
    if breaks:
        notes.append(
            f"torch.compile split {', '.join(f'{n} ({c})' for n, c in breaks.items())} at graph breaks: those parts "
            f"run eagerly between compiled graphs (TORCH_LOGS=graph_breaks says where)."
        )
    entry.ttft = "compiled stages called in turn"
    return stages, lambda c: _run_stages(stages, c)["prefill"]


def _graph_break_count() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


# ---------------------------------------------------------------------------------------- other runtimes


def _in_runtime(runtime_class: type[Runtime], vlm, ctx, entry: Execution, notes: list[str], options, progress):
    """Each stage prepared in the runtime on the input the runtime's previous stages give it; a stage it refuses
    (StageFallback) runs in torch eagerly, labelled (quantized there, if run.quantize asks). Deviations are from
    the float eager reference, along the path (so they include a quantization's)."""
    runtime = runtime_class(threads=torch.get_num_threads())
    signatures = {}
    plain = _static_stages(vlm, ctx, notes)
    reference = _run_stages(plain, ctx)
    layouts = vlm.declared_layouts()
    entry.stages, entry.runtimes, entry.prepare_s, entry.deviation_from_eager = {}, {}, {}, {}
    stages, out, known = [], ctx, True
    for index, (name, stage) in enumerate(plain):
        progress(f"preparing the {name} stage in {runtime.name}", index, len(plain))
        eager = stage(out)
        # Data-dependent: this stage decides its own token count (the stages after it merely inherit the count).
        static = layouts.get(name, True) is not None or not known
        known = layouts.get(name, True) is not None
        if _passes_on(out, eager):  # a no-op stage (reducer 'none'): nothing to prepare
            entry.stages[name] = entry.runtimes[name] = "no-op"
            entry.deviation_from_eager[name] = deviation(out, reference[name])
            stages.append((name, stage))
            continue
        kind = STAGE_COMPONENT[name]
        component, scheme = getattr(vlm, kind), getattr(options.quantize, kind, None)
        spec = RuntimeStage(name, stage, component, out, eager, static, out_device(out), scheme)
        signatures[name] = {"inputs": tensor_specs(out), "outputs": tensor_specs(eager)}
        start = time.perf_counter()
        try:
            runner = runtime.prepare(spec)
            entry.prepare_s[name] = time.perf_counter() - start
            result = runner(out)
            entry.stages[name] = entry.runtimes[name] = runtime.name
        except StageFallback as exc:
            if scheme is not None:
                quantize(component, scheme)
                eager = stage(out)
            runner, result = stage, eager
            entry.stages[name], entry.runtimes[name] = "eager", TORCH_RUNTIME
            _fall_back(
                entry, notes, f"the {name} stage does not run in {runtime.name} ({exc}): it ran in torch, eagerly."
            )
        entry.deviation_from_eager[name] = deviation(result, reference[name])
        stages.append((name, runner))
        out = result
    notes.extend(runtime.notes)
    entry.ttft = f"the stages called in turn ({runtime.name}, torch for what fell back)"
    for name, (inputs, outputs) in runtime.graph_io.items():  # what the runtime's graph reads and writes
        given = {spec["name"]: spec for spec in signatures[name]["inputs"]}
        made = {spec["name"]: spec for spec in signatures[name]["outputs"]}
        signatures[name] = {
            "inputs": [given[n] for n in inputs],
            "outputs": [{**made[n.removesuffix("_out")], "name": n} for n in outputs],
        }
    return stages, lambda c: _run_stages(stages, c)["prefill"], runtime, signatures


def tensor_specs(value: Any) -> list[dict[str, Any]]:
    """Name, shape and dtype of each of a stage input's or output's tensors (the export manifest's signature)."""
    return [
        {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        for name, t in zip(tensor_names(value), tensors_of(value))
    ]


def _passes_on(value: Any, out: Any) -> bool:
    """Whether every tensor of `out` is one of `value`'s (the stage computed nothing)."""
    given = {id(t) for t in tensors_of(value)}
    return all(id(t) in given for t in tensors_of(out))


def out_device(value: Any) -> torch.device:
    return next((t.device for t in tensors_of(value)), torch.device("cpu"))


# -------------------------------------------------------------------------------------------- CUDA graphs


def _copy_into(static: Any, fresh: Any) -> None:
    """Load a fresh stage input into the static buffers a graph was captured on (same shapes: same image)."""
    for target, source in zip(tensors_of(static), tensors_of(fresh), strict=True):
        if target is not source:
            target.copy_(source)


class Replay:
    """A captured stage: copy a fresh input into its static input (when it is not that input), replay, return the
    static output. Graphs captured on each other's outputs chain without copies."""

    def __init__(self, graph, static_input: Any, static_output: Any):
        self.graph, self.static_input, self.static_output = graph, static_input, static_output

    def __call__(self, value: Any) -> Any:
        if value is not self.static_input:
            _copy_into(self.static_input, value)
        self.graph.replay()
        return self.static_output


def capture(
    fn: Callable[[Any], Any], static_input: Any, pool, before: Callable[[], Any] | None = None
) -> tuple[Any, Any]:
    """A CUDA graph of `fn(static_input)`, after warm-up calls on a side stream (as torch.cuda.graphs requires);
    `before` runs ahead of each warm-up call (e.g. to rewind the state a decoding step advances)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            if before is not None:
                before()
            fn(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(static_input)
    return graph, output


def syncs_with_host(fn: Callable[[Any], Any], value: Any) -> str | None:
    """Why `fn(value)` cannot be captured (it waits for the GPU, e.g. `.item()` or a data-dependent shape), or None."""
    fn(value)  # first calls may initialise libraries; only the steady state is captured
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(value)
    except RuntimeError as exc:
        return first_line(exc, with_type=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


def _capture(vlm, ctx, reference, entry, notes, device, progress):
    entry.stages, entry.deviation_from_eager = {}, {}
    pool = torch.cuda.graph_pool_handle()
    plain = _static_stages(vlm, ctx, [])
    stages, out = [], ctx
    for index, (name, stage) in enumerate(plain):
        progress(f"capturing the {name} stage", index, len(plain))
        if stage(out) is out:  # a no-op stage (reducer 'none'): nothing to capture, an empty graph is an error
            entry.stages[name] = "no-op"
            entry.deviation_from_eager[name] = deviation(out, reference[name])
            stages.append((name, stage))
            continue
        reason = syncs_with_host(stage, out)
        if reason is None:
            try:
                graph, static_output = capture(stage, out, pool)
                runner: Callable = Replay(graph, out, static_output)
                result = runner(out)
            except RuntimeError as exc:
                reason = first_line(exc, with_type=True)
        if reason is not None:
            runner, result = stage, stage(out)
            _fall_back(entry, notes, f"the {name} stage cannot be captured in a CUDA graph ({reason}): it ran eagerly.")
        entry.stages[name] = "cudagraph" if reason is None else "eager"
        entry.deviation_from_eager[name] = deviation(result, reference[name])
        stages.append((name, runner))
        out = result
    eager = [name for name, how in entry.stages.items() if how == "eager"]
    static = all(layout is not None for layout in vlm.declared_layouts().values())
    if not eager and static:

        def whole(c: StageContext) -> torch.Tensor:
            return _run_stages(plain, c)["prefill"]

        progress("capturing the whole TTFT path", 0, 1)
        graph, logits = capture(whole, ctx, torch.cuda.graph_pool_handle())
        entry.ttft = "one CUDA graph for the whole path"
        return stages, Replay(graph, ctx, logits)
    why = (
        f"the {', '.join(eager)} stage(s) ran eagerly"
        if eager
        else "a stage's token count depends on the image (no static shapes)"
    )
    entry.ttft = "stage graphs replayed in turn" + (f", eager {', '.join(eager)} between them" if eager else "")
    notes.append(f"TTFT in cudagraph mode is not one graph: {why}; it chains the stages' graphs.")
    return stages, lambda c: _run_stages(stages, c)["prefill"]


__all__ = [
    "Prepared",
    "Replay",
    "capture",
    "deviation",
    "inductor_settings",
    "param_dtype",
    "prepare",
    "requested",
    "syncs_with_host",
]
