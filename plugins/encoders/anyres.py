"""AnyRes tiling (LLaVA-NeXT / LLaVA-OneVision) as a wrapper around any tile encoder.

The raw image is matched to the best grid of tiles (`anyres_max_9`: every rows x cols grid up to 6 x 6 tiles of
the tile encoder's size), resized into that grid keeping its aspect, padded with black, and cut into crops; a copy of
the whole image squashed to one tile goes first (the base image). The tile encoder runs over all crops at once.

    pixel_values (B, 1 + rows*cols, 3, S, S) -> tokens (B, (1 + rows*cols) * n, C), one Crop per view in the layout

Unpadding the tiled map, LLaVA-OneVision's downsampling to about 9 tiles' worth of tokens and the per-row
image-newline tokens happen after the projector, in the `llava-anyres` connector, which reads this layout (the
crops' tile positions and the raw image size) and nothing else of this module.

Source: LLaVA-VL/LLaVA-NeXT llava_arch.py and mm_utils.py; transformers' llava_onevision image processor and model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ablate.api import (
    ConfigError,
    Crop,
    EncoderConfig,
    ImageSizeError,
    Preprocessing,
    StageContext,
    TokenLayout,
    VisionEncoder,
    component_config,
    hookimpl,
    preprocess,
)

# ------------------------------------------------------------------------------------------- arithmetic


def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) candidate that keeps most of a (height, width) image's pixels, then wastes the least.

    Ties go to the earlier candidate (LLaVA-NeXT's rule, which transformers reproduces).
    """
    height, width = size
    best, best_kept, best_wasted = candidates[0], -1, math.inf
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (cand_h, cand_w), kept, wasted
    return best


def fitted_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a (height, width) image resized into `target` (height, width) keeping its aspect."""
    height, width = size
    target_h, target_w = target
    if target_w / width < target_h / height:
        return min(math.ceil(height * target_w / width), target_h), target_w
    return target_h, min(math.ceil(width * target_h / height), target_w)


# ----------------------------------------------------------------------------------------------- encoder


@dataclass
class AnyResConfig(EncoderConfig):
    # Side of the square raw image assumed when the config sets no `input_size`; None: one tile's size.
    image_size: int | None = None
    tile: dict = field(default_factory=lambda: {"name": "siglip-so400m"})  # the tile encoder: a component node
    max_grid: int = 6  # candidate grids: every rows x cols up to max_grid x max_grid tiles (LLaVA-OneVision: 6)
    # Explicit candidate resolutions, [height, width] in pixels (transformers' image_grid_pinpoints); overrides max_grid.
    grid_pinpoints: list[list[int]] | None = None


class AnyRes(VisionEncoder):
    """AnyRes tiling around any tile encoder (LLaVA-OneVision anyres_max_9): base image plus a grid of crops."""

    name = "anyres"
    Config = AnyResConfig

    @classmethod
    def resolve_config(cls, config: AnyResConfig) -> AnyResConfig:
        _, tile_config = _tile_config(config.tile)  # typed and resolved, as a top-level component is
        if config.max_grid < 1:
            raise ConfigError(f"encoder.max_grid={config.max_grid} must be at least 1 (LLaVA-OneVision: 6).")
        for pinpoint in config.grid_pinpoints or []:
            size = tile_config.image_size
            if len(pinpoint) != 2 or min(pinpoint) < 1 or pinpoint[0] % size or pinpoint[1] % size:
                raise ConfigError(
                    f"encoder.grid_pinpoints holds {pinpoint}: each entry is [height, width] in pixels, both positive "
                    f"multiples of the tile size {size}, e.g. [{size}, {2 * size}]."
                )
        tile = dataclasses.asdict(tile_config)
        size = tile_config.image_size if config.image_size is None else config.image_size
        return replace(config, tile=tile, image_size=size)

    def __init__(self, config: AnyResConfig):
        config = self.resolve_config(config)
        super().__init__(config)
        tile_class, tile_config = _tile_config(config.tile)
        self.tile = tile_class(tile_config)
        grid = self.tile.output_layout().grid
        if grid is None:
            raise ConfigError(
                f"encoder.tile '{self.tile.name}' gives {self.tile.output_layout()}, not one grid of tokens per tile: "
                f"AnyRes needs a tile encoder whose tokens lie on one grid (no CLS or other loose tokens)."
            )
        self.tile_grid = grid
        self.tile_size = tile_config.image_size
        self.width = self.tile.width
        size = self.tile_size
        self.candidates = [tuple(p) for p in config.grid_pinpoints or []] or [
            (size * rows, size * cols)
            for rows in range(1, config.max_grid + 1)
            for cols in range(1, config.max_grid + 1)
        ]

    @property
    def preprocessing(self) -> Preprocessing:
        return replace(self.tile.preprocessing, image_size=self.config.image_size)

    def tiling(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for a raw (width, height) image."""
        width, height = image_size
        if width < 1 or height < 1:
            raise ImageSizeError(f"AnyRes cannot tile an image of {width}x{height} px: both sides must be positive.")
        best_h, best_w = select_best_resolution((height, width), self.candidates)
        return best_h // self.tile_size, best_w // self.tile_size

    def layout_for(self, image_size: tuple[int, int]) -> TokenLayout:
        rows, cols = self.tiling(image_size)
        crops = (Crop(self.tile_grid),) + tuple(
            Crop(self.tile_grid, tile=(r, c)) for r in range(rows) for c in range(cols)
        )
        return TokenLayout(crops=crops, image_size=tuple(image_size))

    def num_tokens(self, image_size: int | None = None) -> int:
        size = self.config.image_size if image_size is None else image_size
        return self.layout_for((size, size)).num_tokens

    def output_layout(self) -> TokenLayout:
        return self.layout_for(self.input_size)

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        rows, cols = self.tiling(self.input_size)
        return (batch_size, 1 + rows * cols, 3, self.tile_size, self.tile_size)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The base image squashed to one tile, then the crops of the image fitted (aspect kept) and black-padded into
        its best grid, row by row: (1 + rows*cols, 3, S, S)."""
        size = self.tile_size
        rows, cols = self.tiling(image.size)
        height, width = fitted_size((image.height, image.width), (rows * size, cols * size))
        canvas = Image.new("RGB", (cols * size, rows * size), (0, 0, 0))
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
        spec = replace(self.tile.preprocessing, resize="squash")
        fitted = image.resize((width, height), resample[spec.interpolation])
        canvas.paste(fitted, ((cols * size - width) // 2, (rows * size - height) // 2))
        views = [image] + [
            canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
        ]
        return torch.stack([preprocess(view, spec) for view in views])

    def forward(self, ctx: StageContext) -> StageContext:
        pixels = ctx.pixel_values
        image_size = ctx.layout.image_size or self.input_size
        layout = self.layout_for(image_size)
        batch, views = pixels.shape[:2]
        if views != len(layout.crops):
            raise ValueError(
                f"{views} views per image, but a {image_size[0]}x{image_size[1]} image tiles into "
                f"{len(layout.crops)} (base + {len(layout.crops) - 1} crops): pixel_values must come from prepare() "
                f"of an image of that size."
            )
        out = self.tile(StageContext(pixel_values=pixels.flatten(0, 1)))
        tokens = out.tokens.reshape(batch, views * out.tokens.shape[1], out.tokens.shape[2])
        return replace(ctx, tokens=tokens, layout=layout)


def _tile_config(node) -> tuple[type, EncoderConfig]:
    """The tile encoder's class and typed config from its node, checked as strictly as a top-level component."""
    if isinstance(node, dict) and node.get("name") == AnyRes.name:
        raise ConfigError("encoder.tile cannot be anyres itself: name the encoder that reads one tile.")
    return component_config("encoder", node, "encoder.tile")


@hookimpl
def register_encoders(register):
    register(AnyRes)
