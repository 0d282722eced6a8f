"""Beyond the first token: generation with the KV cache timed per token and as a whole, the cache's size computed
from the decoder's shape, and throughput for the batch (README: "Decoding").

The decode timing runs after the TTFT repeats, which it leaves exactly as they are. Each repeat generates exactly
run.max_new_tokens tokens twice: once as one call (vision stages, prefill, every step: the end-to-end latency) and
once step by step, each step timed on its own (time per output token); which goes first alternates, as in the TTFT
repeats. The length is fixed (no stop at an end-of-sequence id), so every cell of a grid generates the same number.
A request runs the vision stages as the run prepared them (its mode or runtime), then the prefill and the steps.

Modes. eager: the decoder's own cache, growing a token per step, as a hand-written transformers loop runs it.
compile and cudagraph (torch runtime): a static cache sized for exactly the run's tokens, the prefill into it and
the step compiled with torch.compile, or captured in CUDA graphs and replayed (on a CPU, cudagraph decodes in
compile mode, as the stages do). The first step's logits are checked against the eager loop's
(decode.deviation_from_eager). What cannot run statically decodes eagerly and says why: in-LLM pruning (its
layers' caches differ in length), a decoder without `static_cache`, a compiler failure, a step that waits for the
host, another runtime.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ablate.api.components import DECODER_PRUNING, DecoderPruning, StageContext
from ablate.api.errors import ConfigError, first_line
from ablate.api.runtimes import TORCH_RUNTIME
from ablate.config.run_options import RunOptions
from ablate.measurement.counting import flop_counter
from ablate.measurement.modes import Replay, capture, deviation, inductor_settings, param_dtype
from ablate.measurement.record import Decode, KVCache, Record, Samples, Throughput
from ablate.measurement.timing import Progress, StageTimer, spread


def check_decodes(decoder, options: RunOptions) -> None:
    """A ConfigError when run.max_new_tokens asks for generation that the decoder cannot do."""
    if options.max_new_tokens and not decoder.decodes:
        raise ConfigError(
            f"decoder '{decoder.name}' does not generate with a KV cache (its `decodes` is False), so "
            f"run.max_new_tokens={options.max_new_tokens} cannot be timed. Leave run.max_new_tokens at 0 (time to "
            f"first token only), or use a decoder that implements `step` (e.g. hf-causal-lm)."
        )


def samples(values: list[float]) -> Samples:
    """Median, p90, minimum and IQR of `values` (empty: every figure None)."""
    if not values:
        return Samples(samples=0)
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return Samples(
        median=statistics.median(values), p90=p90, min=min(values), spread=spread(values), samples=len(values)
    )


class EagerDecoding:
    """Generation as a hand-written transformers loop does it: the decoder's own (dynamic) cache, growing a token
    per step."""

    mode = "eager"
    static_length = deviation_from_eager = setup_s = None

    def __init__(self, vlm):
        self.vlm = vlm
        self.ids, self.cache, self.position = None, None, 0

    def prefill(self, vision_out: StageContext) -> None:
        self.ids, self.cache, self.position = self.vlm.start_decoding(vision_out)

    def step(self) -> torch.Tensor:
        """One step: feed the last ids, keep the next; returns its logits."""
        logits = self.vlm.decoder.step(self.ids, self.cache, self.position).logits
        self.ids, self.position = logits.argmax(dim=-1, keepdim=True), self.position + 1
        return logits


class StaticDecoding:
    """Generation into a cache of fixed shape (`Decoder.static_cache`), sized for exactly the run's tokens, with the
    ids and the position kept in tensors that every step updates in place. Nothing in a step depends on a Python
    value, so one compiled graph (compile) or one CUDA graph (cudagraph) serves every step; the prefill into the
    cache is compiled or captured too. Until `compile` or `capture`, it runs eagerly."""

    mode = "eager"
    deviation_from_eager = setup_s = None  # set once compiled or captured

    def __init__(self, vlm, vision_out: StageContext, cache, image_at: int, length: int):
        self.vlm, self.cache, self.image_at, self.static_length = vlm, cache, image_at, length
        self.first_position = vision_out.input_ids.shape[1] - 1 + vision_out.tokens.shape[1]  # the prefill's length
        rows, device = vision_out.input_ids.shape[0], vision_out.input_ids.device
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.prefill, self.step = self.plain_prefill, self.plain_step

    def plain_prefill(self, vision_out: StageContext) -> torch.Tensor:
        # Spliced at the placeholder's known position: the VLM's own splice checks each row, waiting for the device.
        embeds, _, _ = self.vlm.splice(
            vision_out.tokens, vision_out.input_ids, vision_out.text_embeds, position=self.image_at
        )
        logits = self.vlm.decoder(embeds, cache=self.cache).logits
        self.ids.copy_(logits.argmax(dim=-1, keepdim=True))
        self.position.fill_(self.first_position)
        return logits

    def plain_step(self) -> torch.Tensor:
        logits = self.vlm.decoder.step(self.ids, self.cache, self.position).logits
        self.ids.copy_(logits.argmax(dim=-1, keepdim=True))
        self.position.add_(1)
        return logits

    def compile(self, vision_out: StageContext, device: torch.device) -> None:
        """torch.compile both, static shapes (on the CPU with inductor's freezing, as the stages are compiled)."""
        prefill, step = torch.compile(self.plain_prefill, dynamic=False), torch.compile(self.plain_step, dynamic=False)
        with inductor_settings(device):  # read when a graph compiles: at the first call
            prefill(vision_out)
            step()
        self.prefill, self.step, self.mode = prefill, step, "compile"

    def capture(self, vision_out: StageContext) -> None:
        """Capture both in CUDA graphs on `vision_out` (the vision stages' static output). No host-sync probe first,
        as the stages have: transformers takes its capture-safe paths only while a stream captures. A step that
        cannot be captured raises a RuntimeError."""
        pool = torch.cuda.graph_pool_handle()
        prefill_graph, prefill_logits = capture(self.plain_prefill, vision_out, pool)
        # Each warm-up step is preceded by a prefill, which rewinds the cache the step advances.
        step_graph, step_logits = capture(
            lambda _: self.plain_step(), None, pool, before=lambda: self.plain_prefill(vision_out)
        )
        step = Replay(step_graph, None, step_logits)
        self.prefill, self.step = Replay(prefill_graph, vision_out, prefill_logits), lambda: step(None)
        self.mode = "cudagraph"


def decoding_path(vlm, prepared, options: RunOptions, device: torch.device, progress: Progress):
    """The decode as the run's mode runs it, and why it fell back to eager (None when it did not). A static path
    is checked against the eager loop on its first step (`deviation_from_eager`)."""
    entry, eager = prepared.entry, EagerDecoding(vlm)
    if entry.used.runtime != TORCH_RUNTIME:
        return eager, (
            f"the decode ran in torch, eagerly: runtime {entry.used.runtime} prepares the stages up to the first "
            f"token, not the decoding steps."
        )
    if entry.requested.mode == "eager":
        return eager, None
    mode = entry.requested.mode if device.type == "cuda" else "compile"  # cudagraph on a CPU: as the stages fell back
    vision_out = vision_stages(prepared)(prepared.ctx)
    why = _why_not_static(vlm, vision_out, options)
    cache = None
    if why is None:
        length = vision_out.input_ids.shape[1] - 1 + vision_out.tokens.shape[1] + options.max_new_tokens - 1
        dtype = param_dtype(vlm.decoder) or torch.float32
        cache = vlm.decoder.static_cache(vision_out.input_ids.shape[0], length, dtype, device)
        if cache is None:
            why = f"decoder '{vlm.decoder.name}' has no static cache (its `static_cache` returned None)."
    if why is None:
        static = StaticDecoding(vlm, vision_out, cache, vlm.image_position(vision_out.input_ids), length)
        start = time.perf_counter()
        verb = "capture" if mode == "cudagraph" else "compile"
        progress(f"{verb[:-1]}ing the decoding step", 0, 1)
        try:
            static.capture(vision_out) if mode == "cudagraph" else static.compile(vision_out, device)
        except Exception as exc:  # noqa: BLE001 - any compiler or capture failure: decode eagerly, and say why
            why = f"the decoding step failed to {verb} ({first_line(exc, with_type=True)})."
    if why is not None:
        return eager, f"the decode ran eagerly, not in {mode} mode: {why}"
    static.setup_s = time.perf_counter() - start
    eager.prefill(vision_out)
    reference = eager.step()
    static.prefill(vision_out)
    static.deviation_from_eager = deviation(static.step(), reference)
    return static, None


def _why_not_static(vlm, vision_out: StageContext, options: RunOptions) -> str | None:
    if options.max_new_tokens < 2:
        return "one output token is the prefill's: there is no decoding step to compile or capture."
    if DECODER_PRUNING in vision_out.extras:
        return (
            "in-LLM pruning leaves the layers' caches at different lengths, and a static cache (what a compiled or "
            "captured step needs) holds one length for all."
        )
    if vlm.image_position(vision_out.input_ids) is None:
        return (
            "the image placeholder sits at different positions in the batch's prompts, and splicing row by row waits "
            "for the device."
        )
    return None


def vision_stages(prepared) -> Callable[[StageContext], StageContext]:
    """The prepared stages up to the prefill, in the run's mode or runtime: what a request runs before decoding."""
    stages = [stage for name, stage in prepared.stages if name != "prefill"]

    def run(ctx: StageContext) -> StageContext:
        for stage in stages:
            ctx = stage(ctx)
        return ctx

    return run


def time_decode(
    vlm, prepared, options: RunOptions, device: torch.device, progress: Progress, ttft_ms: float | None
) -> tuple[Decode, int, str | None]:
    """Time generation of run.max_new_tokens tokens from the prepared run (see the module docstring); returns the
    record's decode block, the bytes the last generation's cache held (`Decoder.cache_bytes`), and why the decode
    did not run in the run's mode (None when it did)."""
    tokens, steps = options.max_new_tokens, options.max_new_tokens - 1
    timer = StageTimer(device)
    with torch.inference_mode():
        path, fallback = decoding_path(vlm, prepared, options, device, progress)
    vision = vision_stages(prepared)

    def end_to_end():
        path.prefill(vision(prepared.ctx))
        for _ in range(steps):
            path.step()

    def step_by_step():
        path.prefill(vision(prepared.ctx))
        for _ in range(steps):
            timer("step", path.step)

    planned = options.warmup + options.repeats
    start = time.perf_counter()
    with torch.inference_mode():
        for repeat in range(planned):
            progress("timing decode" if repeat >= options.warmup else "warming up decode", repeat, planned)
            timer.recording = repeat >= options.warmup
            if repeat % 2:
                timer("end_to_end", end_to_end)
            step_by_step()
            if not repeat % 2:
                timer("end_to_end", end_to_end)
    progress("done", planned, planned)
    per_token, whole = samples(timer.samples["step"]), samples(timer.samples["end_to_end"])
    static = isinstance(path, StaticDecoding)
    decode = Decode(
        max_new_tokens=tokens,
        steps=steps,
        cache=type(path.cache).__name__,
        mode=path.mode,
        static_length=path.static_length,
        deviation_from_eager=path.deviation_from_eager,
        setup_s=path.setup_s,
        repeats=options.repeats,
        per_token_ms=per_token,
        end_to_end_ms=whole,
        seconds=time.perf_counter() - start,
    )
    if ttft_ms is not None:
        decode.predicted_end_to_end_ms = ttft_ms + steps * per_token.median
        decode.prefill_share = ttft_ms / whole.median
    measured = vlm.decoder.cache_bytes(path.cache)
    # The FLOPs of one step, untimed (they do not depend on the ids fed). The eager cache at its end length: one
    # more step on it. A static cache has no room left, but every step over it costs the same: the first one again.
    with torch.inference_mode():
        if static:
            path.plain_prefill(vision(prepared.ctx))
        with flop_counter() as counter:
            path.plain_step() if static else path.step()
    decode.step_flops = counter.get_total_flops()
    return decode, measured, fallback


def step_traffic(decoder_weight_bytes: int, cache: KVCache | None, decode: Decode) -> dict | None:
    """{flops, bytes} of the median decoding step for the roofline: the decoder's weights read once, and the KV cache
    as the average step reads it (it grows by one token per step), plus what the step writes into it."""
    if cache is None or cache.bytes is None or not decode.steps:
        return None
    grown = (cache.bytes - cache.prefill_bytes) // decode.steps  # one token of the batch, every layer
    average_read = cache.prefill_bytes + grown * (decode.steps - 1) / 2
    if decode.static_length:  # every step attends over the whole static cache, the positions not written masked
        average_read = cache.bytes
    return {
        "flops": decode.step_flops,
        "bytes": int(decoder_weight_bytes + average_read + grown),
        "bytes_unfused": None,
    }


def throughput(record: Record) -> Throughput:
    """The record's throughput block from its TTFT and decode figures."""
    batch, ttft, decode = record.batch_size or 1, record.latency_ms.ttft, record.decode
    figures = Throughput(request_latency_ms=ttft)
    if ttft:
        figures.images_per_s = batch * 1000.0 / ttft
    if decode is not None and decode.end_to_end_ms.median:
        figures.output_tokens_per_s = batch * decode.max_new_tokens * 1000.0 / decode.end_to_end_ms.median
        figures.request_latency_ms = decode.end_to_end_ms.median
    if decode is not None and decode.per_token_ms.median:
        figures.decode_tokens_per_s = batch * 1000.0 / decode.per_token_ms.median
    return figures


def kv_cache(
    decoder,
    dtype: torch.dtype,
    batch: int,
    llm_input: int | None,
    visual: int | None,
    pruning: DecoderPruning | None,
    max_new_tokens: int,
) -> KVCache | None:
    """The cache's size from the decoder's shape (None when the decoder does not state it or the tokens are unknown).

    Every layer holds a key and a value per token; after in-LLM pruning the layers from `pruning.layer` on hold the
    text and the kept visual tokens only. Generation adds one token per step to every layer.
    """
    layers, heads, head_dim = decoder.num_layers, decoder.num_kv_heads, decoder.head_dim
    if not (layers and heads and head_dim) or llm_input is None:
        return None
    per_layer = 2 * heads * head_dim * dtype.itemsize  # one token, one row, one layer: its key and its value
    generated = max(max_new_tokens - 1, 0)
    pruned = 0 if pruning is None or visual is None else layers - pruning.layer
    shorter = None if not pruned else llm_input - visual + pruning.keep

    def total(extra: int, prune: bool = True) -> int:
        if not prune or not pruned:
            return batch * per_layer * layers * (llm_input + extra)
        return batch * per_layer * ((layers - pruned) * (llm_input + extra) + pruned * (shorter + extra))

    return KVCache(
        dtype=str(dtype).removeprefix("torch."),
        layers=layers,
        kv_heads=heads,
        head_dim=head_dim,
        bytes_per_token=per_layer * layers,
        tokens=llm_input + generated,
        pruned_layers=pruned,
        pruned_layer_tokens=None if shorter is None else shorter + generated,
        prefill_bytes=total(0),
        bytes=total(generated),
        unpruned_bytes=total(generated, prune=False) if pruned else None,
    )
