"""`example-patchconv`: a strided Conv2d patchifier and a few depthwise-conv blocks, one token per patch.

A worked example of a third-party ablate encoder. It imports only ablate's public plugin API, `ablate.api`, exactly
as any plugin package (built-in ones included) does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ablate.api import (
    CLS,
    ConfigError,
    EncoderConfig,
    Preprocessing,
    StageContext,
    TokenLayout,
    VisionEncoder,
    check_multiple,
    hookimpl,
)


@dataclass
class PatchConvConfig(EncoderConfig):
    """Options, settable as `encoder.KEY=VALUE`; the inherited `image_size` is the input size in pixels."""

    image_size: int = 64
    patch_size: int = 8  # stride of the patchifier: one token per patch_size x patch_size patch
    width: int = 64  # token width (channels)
    depth: int = 2  # convolutional blocks after the patchifier


class ConvBlock(nn.Module):
    """Pre-norm residual block: depthwise 3x3 conv (mixes neighbouring patches), then a pointwise MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)  # statistics per image, never per batch: rows stay independent
        self.spatial = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width)
        self.mlp = nn.Sequential(nn.Conv2d(width, 4 * width, 1), nn.GELU(), nn.Conv2d(4 * width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.spatial(self.norm(x)))


class PatchConvEncoder(VisionEncoder):
    """Example plugin: strided-conv patchifier plus depthwise-conv blocks, one token per patch."""

    name = "example-patchconv"
    Config = PatchConvConfig
    # CLS here is a mean-pooled summary token: reducers that need a global query (e.g. for scoring) can ask for it.
    provides = frozenset({CLS})

    def __init__(self, config: PatchConvConfig):
        super().__init__(config)
        if config.patch_size < 1 or config.width < 1 or config.depth < 0:
            raise ConfigError(
                f"example-patchconv needs encoder.patch_size >= 1, encoder.width >= 1 and encoder.depth >= 0; "
                f"got {config.patch_size}, {config.width} and {config.depth}."
            )
        self.width = config.width
        self.patchify = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.blocks = nn.Sequential(*(ConvBlock(config.width) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.width)

    @property
    def preprocessing(self) -> Preprocessing:
        # Inputs scaled to [-1, 1]; any aspect ratio squashed to the square the encoder was configured for.
        return Preprocessing(self.config.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")

    def num_tokens(self, image_size: int | None = None) -> int:
        size = image_size or self.config.image_size
        # Patches must tile the image exactly; check_multiple raises ImageSizeError naming the nearest good sizes.
        check_multiple(self.name, size, self.config.patch_size)
        return (size // self.config.patch_size) ** 2

    def forward(self, ctx: StageContext) -> StageContext:
        x = self.blocks(self.patchify(ctx.pixel_values))  # (B, width, h, w)
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, width), row-major over the grid
        # The context is immutable: return a copy with what this stage produced (tokens, their grid, extras).
        layout = TokenLayout.grid_of(x.shape[2], x.shape[3], image_size=ctx.layout.image_size)
        # Extras cost time: compute them only when a reducer asked at build time.
        cls_token = tokens.mean(dim=1) if CLS in self.requested else None
        return replace(ctx, tokens=tokens, layout=layout, cls=cls_token)


@hookimpl
def register_encoders(register):
    register(PatchConvEncoder)
