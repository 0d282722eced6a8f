"""Counting without running: FLOPs per stage on the meta device, token counts, weight memory and whether it fits."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ablate.api.components import DecoderPruning, StageContext
from ablate.api.errors import ResourceError
from ablate.api.hooks import KINDS
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import available_memory
from ablate.model.vlm import STAGES

VISION_STAGES = STAGES[:-1]  # encoder, reducer, connector: the stages before the LLM


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts torch's dynamically quantized Linear (run.quantize int8-dynamic): the stock
    one does not know its op, and would count a quantized decoder's step as 0 FLOPs."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.quantized.linear_dynamic: _quantized_linear_flops})


def _quantized_linear_flops(input_shape, packed, *_, out_shape=None, **__) -> int:
    in_features = packed.unpack()[0].shape[1]  # the packed int8 weight, (out, in)
    return 2 * out_shape.numel() * in_features


def meta_context(vlm, batch_size: int, prompt_tokens: int) -> StageContext:
    pixels = torch.empty(vlm.encoder.input_shape(batch_size), device="meta")
    ids = torch.zeros(batch_size, prompt_tokens + 1, dtype=torch.long, device="meta")
    return vlm.start(pixels, ids)


def count_vision(
    vlm, ctx: StageContext, stop_at_unknown: bool = True
) -> tuple[dict[str, int | None], dict[str, int | None], StageContext]:
    """FLOPs and output token count of each vision stage, run on `ctx` (meta or real tensors), and the last output.

    Meta tensors count every matmul, attention included (on real CPU tensors FlopCounterMode misses the fused
    attention kernel). A stage whose output size depends on the data (an adaptive reducer, which declares its
    output layout as None) cannot run on meta: with `stop_at_unknown`, it and the stages after it are left as None.
    """
    flops: dict[str, int | None] = dict.fromkeys(VISION_STAGES)
    tokens: dict[str, int | None] = dict.fromkeys(VISION_STAGES)
    declared = vlm.declared_layouts()
    with torch.no_grad():
        for name, stage in vlm.vision_stages():
            if stop_at_unknown and declared[name] is None:
                break
            key = _encoder_key(vlm, ctx) if name == "encoder" else None
            if key in _ENCODER_COUNTS:
                flops[name], out = _ENCODER_COUNTS[key]
                ctx = replace(out, pixel_values=ctx.pixel_values, input_ids=ctx.input_ids, text_embeds=ctx.text_embeds)
            else:
                with flop_counter() as counter:
                    ctx = stage(ctx)
                flops[name] = counter.get_total_flops()
                if key is not None:
                    _ENCODER_COUNTS[key] = flops[name], ctx
            tokens[name] = ctx.num_tokens
    return flops, tokens, ctx


# The encoder stage on the meta device depends on the encoder's config and input shape alone, and it is the costly
# one to count: a grid counts each encoder once per process.
_ENCODER_COUNTS: dict[str, tuple[int, StageContext]] = {}


def _encoder_key(vlm, ctx: StageContext) -> str | None:
    if ctx.pixel_values is None or not ctx.pixel_values.is_meta:
        return None  # real tensors: the counts may depend on the image
    encoder = vlm.encoder
    parts = [type(encoder).__qualname__, dataclasses.asdict(encoder.config), list(ctx.pixel_values.shape)]
    parts += [str(ctx.pixel_values.dtype), sorted(encoder.requested), ctx.layout.image_size, encoder.input_size]
    return json.dumps(parts, sort_keys=True, default=str)


def count_prefill_flops(
    vlm, batch_size: int, tokens: int, pruning: DecoderPruning | None = None, visual: int = 0
) -> int:
    """FLOPs of the LLM prefill over `tokens` positions, on the meta device; with `pruning` (an in-LLM reducer's
    order), the pruned prefill, its `visual` visual tokens first (LLaVA's prompt order).

    A plain prefill's FLOPs are a quadratic in the sequence length (linear layers grow with it, attention with its
    square), so each decoder config is counted at three lengths once per process and any other length follows
    exactly; the fit is checked at a fourth length, and a decoder it does not hold for is counted every time."""
    if pruning is not None:
        return _prefill_flops(vlm, batch_size, tokens, pruning, visual)
    key = json.dumps([dataclasses.asdict(vlm.decoder.config), batch_size], sort_keys=True, default=str)
    if key not in _PREFILL_FIT:
        at = [_prefill_flops(vlm, batch_size, length) for length in _FIT_LENGTHS]
        fit = (at[0], at[1] - at[0], at[2] - 2 * at[1] + at[0])  # Newton's forward differences, step 64
        _PREFILL_FIT[key] = (
            fit if _quadratic(fit, _CHECK_LENGTH) == _prefill_flops(vlm, batch_size, _CHECK_LENGTH) else None
        )
    fit = _PREFILL_FIT[key]
    return _prefill_flops(vlm, batch_size, tokens) if fit is None else _quadratic(fit, tokens)


_FIT_LENGTHS, _CHECK_LENGTH = (64, 128, 192), 320
_PREFILL_FIT: dict[str, tuple[int, int, int] | None] = {}  # decoder config and batch -> fit (None: not quadratic)


def _quadratic(fit: tuple[int, int, int], tokens: int) -> int:
    """The quadratic through the counts at 64, 128 and 192 positions, at `tokens` positions, in exact integers."""
    first, step, curve = fit
    x = tokens - _FIT_LENGTHS[0]  # in units of the 64-token step: x / 64, kept exact by dividing last
    return first + (x * step) // 64 + (x * (x - 64) * curve) // (2 * 64 * 64)


def _prefill_flops(vlm, batch_size: int, tokens: int, pruning: DecoderPruning | None = None, visual: int = 0) -> int:
    embeds = torch.empty(batch_size, tokens, vlm.decoder.hidden_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if pruning is None:
            vlm.decoder(embeds)
        else:
            positions = torch.arange(visual, device="meta").expand(batch_size, -1)
            vlm.decoder.prefill_pruned(embeds, positions, pruning)
    return counter.get_total_flops()


def with_total(flops: dict[str, int | None]) -> dict[str, int | None]:
    stages = {key: flops.get(key) for key in STAGES}
    total = sum(stages.values()) if all(v is not None for v in stages.values()) else None
    return {**stages, "total": total}


def param_bytes(vlm, options: RunOptions) -> int:
    """Bytes of the weights in the dtypes they will be built in."""
    total = 0
    for kind in KINDS:
        element = torch.empty((), dtype=options.dtype_of(kind)).element_size()
        total += sum(p.numel() for p in getattr(vlm, kind).parameters()) * element
    return total


def check_fits(vlm, options: RunOptions) -> None:
    """Refuse a run whose weights alone (plus a working margin) would not fit, before allocating them."""
    device = torch.device(options.device)
    needed = int(param_bytes(vlm, options) * 1.2)
    available = available_memory(device)
    if available is not None and needed > available:
        smaller = " or --dtype bfloat16 (half the memory)" if options.dtype == "float32" else ""
        raise ResourceError(
            f"This configuration needs about {needed / 2**30:.1f} GiB for its weights in {options.dtype} on "
            f"{device}, but only {available / 2**30:.1f} GiB is available. Use --count-only to get tokens, "
            f"parameters and FLOPs without allocating weights{smaller}, or pick a smaller model."
        )


def token_summary(vlm, tokens: dict[str, Any], prompt_tokens: int) -> dict[str, int | None]:
    """Tokens at every stage for one image: out of each vision stage, and what the LLM reads in all (None: unknown)."""
    last = vlm.vision_stages()[-1][0]
    visual = tokens.get(last)
    summary = {name: tokens.get(name) for name in VISION_STAGES}
    return {**summary, "llm_input": None if visual is None else visual + prompt_tokens}
