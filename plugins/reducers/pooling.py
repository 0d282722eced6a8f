"""Average pooling of the token grid: `avgpool`, and Matryoshka (M3) nested scales on top of it.

Both pool with `torch.nn.functional.avg_pool2d`, kernel = stride, flooring what does not fit, as M3's released code
does (mu-cai/matryoshka-mm `matryoshka_vis_token_process`). A budget `tokens=N` picks the kernel: the largest square
kernel k with floor(H/k) * floor(W/k) = N, or the whole grid for N = 1 (so 1/9/36/144/576 on a 24x24 grid, and
1/4/16/64/256 on FastViTHD's 16x16 grid at 1024 px). A count no kernel gives fails at build time, listing the
counts that work; `adaptive=true` reaches it with `adaptive_avg_pool2d` to a square grid instead (overlapping
windows, as LDPv2's AdaptiveAvgPool2d(12x12)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ablate.api import ConfigError, ReducerConfig, StageContext, TokenLayout, TokenReducer, hookimpl, square_grid

Kernel = tuple[int, int]


def kernels(grid: tuple[int, int]) -> dict[int, Kernel]:
    """Token count -> the pooling kernel that gives it on `grid`: the largest square kernel, or the whole grid."""
    rows, cols = grid
    options: dict[int, Kernel] = {}
    for k in range(1, max(rows, cols) + 1):
        count = (rows // k) * (cols // k)
        if count:
            options[count] = (k, k)  # later (larger) kernels win: they cover more of the grid
    options[1] = (rows, cols)
    return dict(sorted(options.items()))


def pool(tokens: torch.Tensor, grid: tuple[int, int], kernel: Kernel) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H*W, C) row-major tokens -> (B, H'*W', C) average-pooled with kernel = stride, and the new grid."""
    batch, _, width = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, width, *grid)
    pooled = F.avg_pool2d(image, kernel_size=kernel, stride=kernel)
    return pooled.flatten(2).transpose(1, 2), (pooled.shape[2], pooled.shape[3])


@dataclass
class AvgPoolConfig(ReducerConfig):
    tokens: int | None = None  # budget: the kernel that gives exactly this many tokens (see the module docstring)
    kernel: int | None = None  # or the kernel (= stride) itself; neither set: kernel 2
    adaptive: bool = False  # reach `tokens` with adaptive_avg_pool2d to a sqrt(tokens) square when no kernel does


class AvgPool(TokenReducer):
    """2-D average pooling of the token grid to a budget (`tokens`) or by a kernel."""

    name = "avgpool"
    Config = AvgPoolConfig
    needs_grid = True

    def __init__(self, config: AvgPoolConfig):
        super().__init__(config)
        if config.tokens is not None and config.kernel is not None:
            raise ConfigError(
                f"reducer.tokens={config.tokens} and reducer.kernel={config.kernel} both set: give one of them."
            )
        if config.kernel is not None and config.kernel < 1:
            raise ConfigError(f"reducer.kernel={config.kernel} must be at least 1.")
        if config.adaptive and config.tokens is None:
            raise ConfigError("reducer.adaptive=true needs reducer.tokens, the square count to pool to.")
        if config.adaptive and square_grid(config.tokens) is None:
            raise ConfigError(
                f"reducer.adaptive=true pools to a square grid, but reducer.tokens={config.tokens} is not a square "
                f"number: use e.g. {_near_square(config.tokens)}."
            )

    def plan(self, grid: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """('kernel', kernel) or ('adaptive', output grid) for an input grid; ConfigError naming the options."""
        config = self.config
        if config.tokens is None:
            k = config.kernel or 2
            if k > min(grid) and (k, k) != grid:
                raise ConfigError(
                    f"reducer.kernel={k} is larger than the {grid[0]}x{grid[1]} token grid: use at most {min(grid)}."
                )
            return "kernel", (k, k)
        options = kernels(grid)
        if config.tokens in options:
            return "kernel", options[config.tokens]
        side = square_grid(config.tokens)
        if config.adaptive and side is not None and side[0] <= min(grid):
            return "adaptive", side
        hint = "" if config.adaptive else ", or set reducer.adaptive=true for a square count up to the grid"
        raise ConfigError(
            f"reducer '{self.name}' cannot pool a {grid[0]}x{grid[1]} token grid to reducer.tokens={config.tokens}: "
            f"pooling with kernel = stride gives {', '.join(map(str, options))} tokens{hint}."
        )

    def check_pipeline(self, encoder, connector, decoder) -> None:
        layout = self.input_layout(encoder, connector)
        if layout.grid is not None:
            self.plan(layout.grid)  # first: its message lists the counts pooling can give
        super().check_pipeline(encoder, connector, decoder)

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        return TokenLayout.grid_of(*self._reduce_grid(layout.grid), layout.image_size)

    def _reduce_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        how, size = self.plan(grid)
        return size if how == "adaptive" else (grid[0] // size[0], grid[1] // size[1])

    def _pool(self, ctx: StageContext) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = _grid(ctx, self.name)
        how, size = self.plan(grid)
        if how == "kernel":
            return pool(ctx.tokens, grid, size)
        batch, _, width = ctx.tokens.shape
        image = ctx.tokens.transpose(1, 2).reshape(batch, width, *grid)
        return F.adaptive_avg_pool2d(image, size).flatten(2).transpose(1, 2), size

    def forward(self, ctx: StageContext) -> StageContext:
        tokens, grid = self._pool(ctx)
        return replace(ctx, tokens=tokens, layout=TokenLayout.grid_of(*grid, ctx.layout.image_size))


def _grid(ctx: StageContext, name: str) -> tuple[int, int]:
    grid = ctx.layout.grid
    if grid is None:
        raise ValueError(f"reducer '{name}' pools a 2-D token grid; it got {ctx.layout}")
    return grid


def _near_square(count: int) -> int:
    side = max(1, round(count**0.5))
    return side * side


# --------------------------------------------------------------------------------------------- matryoshka

MATRYOSHKA_SCALES = "matryoshka_scales"  # ctx.extras key: {token count: (B, count, C) tokens} with all_scales


def nested_scales(grid: tuple[int, int]) -> list[int]:
    """M3's nested token counts on a grid: halve both sides while both are even, then the whole grid to 1
    (24x24: 576, 144, 36, 9, 1; 16x16: 256, 64, 16, 4, 1)."""
    rows, cols = grid
    counts = [rows * cols]
    while rows % 2 == 0 and cols % 2 == 0 and rows * cols > 1:
        rows, cols = rows // 2, cols // 2
        counts.append(rows * cols)
    if counts[-1] != 1:
        counts.append(1)
    return counts


@dataclass
class MatryoshkaConfig(AvgPoolConfig):
    # M3's released code pools the projector's output (the paper pools the encoder's tokens: before_connector).
    position: Literal["before_connector", "after_connector"] = "after_connector"
    all_scales: bool = False  # also return every nested scale in ctx.extras["matryoshka_scales"]
    scales: list[int] = field(default_factory=list)  # the nested counts; empty: M3's pyramid (`nested_scales`)


class Matryoshka(AvgPool):
    """Matryoshka M3: nested average-pooled scales (1/9/36/144/576 on 24x24), chosen by `tokens`; all at once.

    Interface for multi-scale training: `tokens` is the budget (the scale the LLM receives; none: the full grid)
    and `all_scales=true` adds `ctx.extras["matryoshka_scales"] = {count: tokens}`, one (B, count, C) tensor per
    nested scale (`scales`, default M3's pyramid on the grid, the budget's scale included), all of the same width
    and taken at this stage's position (after the connector by default, as M3's code). A training loop runs the
    rest of the pipeline once per entry, replacing `ctx.tokens` (and the layout: a square grid of that count),
    and averages the losses, as M3 does.
    """

    name = "matryoshka"
    Config = MatryoshkaConfig

    def __init__(self, config: MatryoshkaConfig):
        super().__init__(config)
        if any(count < 1 for count in config.scales):
            raise ConfigError(f"reducer.scales={config.scales} must hold positive token counts.")

    def plan(self, grid: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        if self.config.tokens is None and self.config.kernel is None:
            return "kernel", (1, 1)  # no budget: the full grid (the largest scale)
        return super().plan(grid)

    def scale_counts(self, grid: tuple[int, int]) -> list[int]:
        """The counts returned with all_scales, largest first; ConfigError for a count no kernel gives."""
        options = kernels(grid)
        counts = list(self.config.scales) or nested_scales(grid)
        bad = [count for count in counts if count not in options]
        if bad:
            raise ConfigError(
                f"reducer.scales holds {bad}, which pooling cannot give on a {grid[0]}x{grid[1]} token grid: "
                f"use counts among {', '.join(map(str, options))}."
            )
        budget = self._reduce_grid(grid)
        return sorted(set(counts) | {budget[0] * budget[1]}, reverse=True)

    def check_pipeline(self, encoder, connector, decoder) -> None:
        super().check_pipeline(encoder, connector, decoder)
        layout = self.input_layout(encoder, connector)
        if self.config.all_scales and layout.grid is not None:
            self.scale_counts(layout.grid)

    def forward(self, ctx: StageContext) -> StageContext:
        out = super().forward(ctx)
        if not self.config.all_scales:
            return out
        grid = _grid(ctx, self.name)
        options = kernels(grid)
        scales = {
            count: out.tokens if count == out.num_tokens else pool(ctx.tokens, grid, options[count])[0]
            for count in self.scale_counts(grid)
        }
        return replace(out, extras={**ctx.extras, MATRYOSHKA_SCALES: scales})


@hookimpl
def register_reducers(register):
    register(AvgPool)
    register(Matryoshka)
