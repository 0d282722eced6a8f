"""LLaVA's connectors: linear (LLaVA v1) and mlp2x_gelu (LLaVA-1.5, FastVLM, ConvLLaVA, LLaVA-OneVision)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ablate.api import Connector, StageContext, hookimpl


class Linear(Connector):
    """One Linear(encoder width, decoder width), as in LLaVA v1."""

    name = "linear"

    def __init__(self, config, in_width: int, out_width: int):
        super().__init__(config, in_width, out_width)
        self.proj = nn.Linear(in_width, out_width)

    def forward(self, ctx: StageContext) -> StageContext:
        return replace(ctx, tokens=self.proj(ctx.tokens))


class Mlp2xGelu(Connector):
    """Linear -> GELU -> Linear to the decoder width (LLaVA-1.5 `mlp2x_gelu`, FastVLM's projector)."""

    name = "mlp2x_gelu"

    def __init__(self, config, in_width: int, out_width: int):
        super().__init__(config, in_width, out_width)
        # Indices 0 and 2 match LLaVA checkpoints' `mm_projector.{0,2}` keys.
        self.layers = nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))

    def forward(self, ctx: StageContext) -> StageContext:
        return replace(ctx, tokens=self.layers(ctx.tokens))


@hookimpl
def register_connectors(register):
    register(Linear)
    register(Mlp2xGelu)
