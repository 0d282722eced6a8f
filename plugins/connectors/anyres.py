"""LLaVA-OneVision's projector and image-newline merge for AnyRes layouts (`llava-anyres`).

mlp2x_gelu on every token, then, for the tiled crops of the layout (those with a `tile` position): reassemble one
map, cut the padding that fitting the image into its grid added (`spatial_unpad`), shrink a map of more than about
`max_tiles` tiles' worth of tokens by their square-root ratio (bilinear; `anyres_max_9`), and end every row with the
learned image-newline token. Untiled crops (the base image) pass through first, unchanged:

    base 27x27 + 3x3 tiles of 27x27 at 1152x1152 px -> 729 + 81 x (81 + 1) = 7371 tokens

Token counts follow from the layout alone (`output_layout`), so they are known before anything runs. Source:
LLaVA-VL/LLaVA-NeXT llava_arch.py (`spatial_unpad`, `anyres_max`), transformers LlavaOnevisionModel.pack_image_features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ablate.api import ConfigError, Connector, ConnectorConfig, Crop, StageContext, TokenLayout, hookimpl

# ------------------------------------------------------------------------------------------- arithmetic


def unpadded_grid(grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) of a padded (rows, cols) feature map that hold the (width, height) image, padding cut."""
    rows, cols = grid
    width, height = image_size
    if width / height > cols / rows:  # wider than the map: padding above and below
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        return rows - 2 * padding, cols
    padding = (cols - int(round(width * (rows / height), 7))) // 2
    return rows, cols - 2 * padding


def unpad_slices(grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[slice, slice]:
    """Row and column slices of the padded map that `unpadded_grid` keeps (the padding is split evenly)."""
    rows, cols = grid
    kept_rows, kept_cols = unpadded_grid(grid, image_size)
    top, left = (rows - kept_rows) // 2, (cols - kept_cols) // 2
    return slice(top, top + kept_rows), slice(left, left + kept_cols)


def downsampled_grid(grid: tuple[int, int], tile_grid: tuple[int, int], max_tiles: int | None) -> tuple[int, int]:
    """LLaVA-OneVision's `anyres_max_N`: a map of more than about N tiles' tokens shrinks by their square-root ratio."""
    rows, cols = grid
    if max_tiles is None:
        return grid
    ratio = math.sqrt(rows * cols / (max_tiles * tile_grid[0] * tile_grid[1]))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return grid


# ------------------------------------------------------------------------------------------- connector


@dataclass
class AnyResMergeConfig(ConnectorConfig):
    max_tiles: int | None = 9  # anyres_max_9; None: never shrink (LLaVA-NeXT's plain `anyres`)
    unpad: bool = True  # cut the padding rows/columns (spatial_unpad)
    newline: bool = True  # an image-newline token after every row of the tiled map


class AnyResMerge(Connector):
    """mlp2x_gelu, then LLaVA-OneVision's unpad, anyres_max_9 shrink and per-row newline tokens on tiled crops."""

    name = "llava-anyres"
    Config = AnyResMergeConfig

    def __init__(self, config: AnyResMergeConfig, in_width: int, out_width: int):
        super().__init__(config, in_width, out_width)
        # LLaVA's mlp2x_gelu projector; indices 0 and 2 match its checkpoints' keys (`mm_projector.{0,2}`).
        self.layers = nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))
        if config.max_tiles is not None and config.max_tiles < 1:
            raise ConfigError(f"connector.max_tiles={config.max_tiles} must be at least 1, or null for no shrinking.")
        # Key name and initialization as transformers' LlavaOnevisionModel.image_newline.
        self.image_newline = nn.Parameter(torch.randn(out_width) / math.sqrt(out_width))

    def _plan(self, layout: TokenLayout):
        """(untiled crops, tiled crops, tile grid, padded map grid, map grid after unpad and shrink)."""
        plain = [crop for crop in layout.crops if crop.tile is None]
        tiles = [crop for crop in layout.crops if crop.tile is not None]
        if not tiles:
            return plain, tiles, None, None, None
        grids = {crop.grid for crop in tiles}
        if len(grids) != 1 or any(crop.newlines for crop in tiles) or layout.loose:
            raise ConfigError(
                f"connector '{self.name}' needs tiles of one grid size and no loose tokens; got {layout}. Put no "
                f"reducer between an AnyRes encoder and this connector, or one that keeps the crops."
            )
        (h, w) = grids.pop()
        rows = 1 + max(crop.tile[0] for crop in tiles)
        cols = 1 + max(crop.tile[1] for crop in tiles)
        padded = (rows * h, cols * w)
        merged = padded
        if self.config.unpad:
            if layout.image_size is None:
                raise ConfigError(
                    f"connector '{self.name}' unpads the tiled map, which needs the raw image size in the layout; the "
                    f"encoder gave none. Set connector.unpad=false, or use an encoder that records it (anyres)."
                )
            merged = unpadded_grid(padded, layout.image_size)
        merged = downsampled_grid(merged, (h, w), self.config.max_tiles)
        return plain, tiles, (h, w), padded, merged

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        plain, tiles, _, _, merged = self._plan(layout)
        if not tiles:
            return layout
        return replace(layout, crops=tuple(plain) + (Crop(merged, newlines=self.config.newline),))

    def forward(self, ctx: StageContext) -> StageContext:
        tokens = self.layers(ctx.tokens)
        plain, tiles, tile_grid, padded, merged = self._plan(ctx.layout)
        if not tiles:
            return replace(ctx, tokens=tokens)
        batch, _, width = tokens.shape
        h, w = tile_grid
        kept, grid = [], torch.zeros(batch, width, *padded, dtype=tokens.dtype, device=tokens.device)
        start = 0
        for crop in ctx.layout.crops:  # token order is crop order
            part = tokens[:, start : start + crop.num_tokens]
            start += crop.num_tokens
            if crop.tile is None:
                kept.append(part)
            else:
                r, c = crop.tile
                grid[:, :, r * h : (r + 1) * h, c * w : (c + 1) * w] = part.transpose(1, 2).reshape(batch, width, h, w)
        if self.config.unpad:
            rows, cols = unpad_slices(padded, ctx.layout.image_size)
            grid = grid[:, :, rows, cols]
        if tuple(grid.shape[2:]) != merged:
            grid = F.interpolate(grid, size=merged, mode="bilinear")
        if self.config.newline:
            newline = self.image_newline.to(grid.dtype).view(1, width, 1, 1).expand(batch, width, merged[0], 1)
            grid = torch.cat([grid, newline], dim=3)
        kept.append(grid.flatten(2).transpose(1, 2))
        return replace(ctx, tokens=torch.cat(kept, dim=1), layout=self.output_layout(ctx.layout))


@hookimpl
def register_connectors(register):
    register(AnyResMerge)
