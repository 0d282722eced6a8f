"""Connectors that cut the token count on the way into the LLM, with the count declared by `output_layout`.

* `ldpv2`: MobileVLM-V2's lightweight downsample projector: Linear -> GELU -> Linear to the LLM width, adaptive
  average pooling of the grid to 12 x 12, then a positional-encoding generator (x + depthwise 3x3 conv):
  576 -> 144 tokens. Source: Meituan-AutoML/MobileVLM vision_projector.py (LDPNetV2Projector).
* `pixel-shuffle`: InternVL's projector: space-to-depth by `scale` (2x2 neighbours into channels, in InternVL's
  order), then LayerNorm -> Linear -> GELU -> Linear: N / scale^2 tokens. Source: transformers' InternVL
  (pixel_shuffle, InternVLMultiModalProjector).

Both need their input on one 2-D grid (a plain encoder's layout).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ablate.api import Connector, ConnectorConfig, IncompatibleComponentsError, StageContext, TokenLayout, hookimpl


def _grid(connector: Connector, layout: TokenLayout) -> tuple[int, int]:
    if layout.grid is None:
        raise IncompatibleComponentsError(
            f"Connector '{connector.name}' needs its input tokens on one 2-D grid, but gets {layout}. Use an encoder "
            f"(and reducer) whose output is one grid, or connector=mlp2x_gelu."
        )
    return layout.grid


def _as_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, rows*cols, C) row-major tokens -> (B, C, rows, cols)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


@dataclass
class LDPv2Config(ConnectorConfig):
    output_grid: int = 12  # MobileVLM-V2: AdaptiveAvgPool2d((12, 12)), 144 tokens


class LDPv2(Connector):
    """MobileVLM-V2 LDPv2: mlp2x_gelu, adaptive avg-pool to 12x12, then x + depthwise 3x3 conv (576 -> 144 tokens)."""

    name = "ldpv2"
    Config = LDPv2Config

    def __init__(self, config: LDPv2Config, in_width: int, out_width: int):
        super().__init__(config, in_width, out_width)
        if config.output_grid < 1:
            raise IncompatibleComponentsError(f"connector.output_grid={config.output_grid} must be at least 1.")
        self.mlp = nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))
        self.peg = nn.Conv2d(out_width, out_width, 3, padding=1, groups=out_width)

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        _grid(self, layout)
        side = self.config.output_grid
        return TokenLayout.grid_of(side, side, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        grid = _grid(self, ctx.layout)
        side = self.config.output_grid
        x = F.adaptive_avg_pool2d(_as_map(self.mlp(ctx.tokens), grid), (side, side))
        x = x + self.peg(x)
        return replace(ctx, tokens=x.flatten(2).transpose(1, 2), layout=self.output_layout(ctx.layout))


@dataclass
class PixelShuffleConfig(ConnectorConfig):
    scale: int = 2  # InternVL downsample_ratio 0.5: 2x2 neighbours per token


class PixelShuffle(Connector):
    """InternVL pixel shuffle: 2x2 neighbours into channels, then LayerNorm + mlp2x_gelu (N/4 tokens)."""

    name = "pixel-shuffle"
    Config = PixelShuffleConfig

    def __init__(self, config: PixelShuffleConfig, in_width: int, out_width: int):
        super().__init__(config, in_width, out_width)
        if config.scale < 1:
            raise IncompatibleComponentsError(f"connector.scale={config.scale} must be at least 1 (InternVL: 2).")
        wide = in_width * config.scale**2
        self.norm = nn.LayerNorm(wide)
        self.mlp = nn.Sequential(nn.Linear(wide, out_width), nn.GELU(), nn.Linear(out_width, out_width))

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        rows, cols = _grid(self, layout)
        s = self.config.scale
        if rows % s or cols % s:
            raise IncompatibleComponentsError(
                f"Connector '{self.name}' with scale {s} needs a token grid divisible by {s}; the encoder gives "
                f"{rows}x{cols}. Change connector.scale or the encoder's image size."
            )
        return TokenLayout.grid_of(rows // s, cols // s, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        layout = self.output_layout(ctx.layout)
        rows, cols = ctx.layout.grid
        s, batch, width = self.config.scale, ctx.tokens.shape[0], ctx.tokens.shape[2]
        # InternVL's order: fold column pairs into channels, transpose, fold row pairs, transpose back.
        x = ctx.tokens.reshape(batch, rows, cols // s, width * s).transpose(1, 2)
        x = x.reshape(batch, cols // s, rows // s, width * s * s).transpose(1, 2)
        x = x.reshape(batch, layout.num_tokens, width * s * s)
        return replace(ctx, tokens=self.mlp(self.norm(x)), layout=layout)


@hookimpl
def register_connectors(register):
    register(LDPv2)
    register(PixelShuffle)
