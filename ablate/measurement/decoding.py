"""Beyond the first token: generation with the KV cache timed per token and as a whole, the cache's size computed
from the decoder's shape, and throughput for the batch (README: "Decoding").

The decode timing runs after the TTFT repeats, which it leaves exactly as they are. Each repeat generates exactly
run.max_new_tokens tokens twice: once as one call (vision stages, prefill, every step: the end-to-end latency) and
once step by step, each step timed on its own (time per output token); which goes first alternates, as in the TTFT
repeats. The length is fixed (no stop at an end-of-sequence id), so every cell of a grid generates the same number.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ablate.api.components import DecoderPruning, StageContext
from ablate.api.errors import ConfigError
from ablate.config.run_options import RunOptions
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


def time_decode(
    vlm, ctx: StageContext, options: RunOptions, device: torch.device, progress: Progress, ttft_ms: float | None
) -> tuple[Decode, int]:
    """Time generation of run.max_new_tokens tokens from the first stage's input `ctx` (see the module docstring);
    returns the record's decode block and the bytes the last generation's cache held (`Decoder.cache_bytes`)."""
    tokens, steps = options.max_new_tokens, options.max_new_tokens - 1
    timer = StageTimer(device)

    def end_to_end():
        return vlm.generate(vlm.run_vision(ctx), tokens)[1]

    first = {}  # the position the first fed-back token takes (the prefill's length), and its ids

    def step_by_step():
        ids, cache, first["position"] = vlm.start_decoding(vlm.run_vision(ctx))
        first["ids"] = ids
        for index in range(steps):
            ids = timer("step", vlm.next_token, ids, cache, position_of(index))
        return cache

    def position_of(index: int) -> int:
        return first["position"] + index

    planned = options.warmup + options.repeats
    start = time.perf_counter()
    with torch.inference_mode():
        for repeat in range(planned):
            progress("timing decode" if repeat >= options.warmup else "warming up decode", repeat, planned)
            timer.recording = repeat >= options.warmup
            if repeat % 2:
                timer("end_to_end", end_to_end)
            cache = step_by_step()
            if not repeat % 2:
                cache = timer("end_to_end", end_to_end)
    progress("done", planned, planned)
    per_token, whole = samples(timer.samples["step"]), samples(timer.samples["end_to_end"])
    decode = Decode(
        max_new_tokens=tokens,
        steps=steps,
        cache=type(cache).__name__,
        mode="eager",
        repeats=options.repeats,
        per_token_ms=per_token,
        end_to_end_ms=whole,
        seconds=time.perf_counter() - start,
    )
    if ttft_ms is not None:
        decode.predicted_end_to_end_ms = ttft_ms + steps * per_token.median
        decode.prefill_share = ttft_ms / whole.median
    measured = vlm.decoder.cache_bytes(cache)
    # The FLOPs of one step: one more, untimed, on the last cache (its FLOPs do not depend on the ids fed).
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vlm.next_token(first["ids"], cache, position_of(steps))
    decode.step_flops = counter.get_total_flops()
    return decode, measured


def step_traffic(decoder_weight_bytes: int, cache: KVCache | None, decode: Decode) -> dict | None:
    """{flops, bytes} of the median decoding step for the roofline: the decoder's weights read once, and the KV cache
    as the average step reads it (it grows by one token per step), plus what the step writes into it."""
    if cache is None or cache.bytes is None or not decode.steps:
        return None
    grown = (cache.bytes - cache.prefill_bytes) // decode.steps  # one token of the batch, every layer
    average_read = cache.prefill_bytes + grown * (decode.steps - 1) / 2
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
