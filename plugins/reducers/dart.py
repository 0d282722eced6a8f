"""DART (Wen et al., 2025, "Stop looking for important tokens in multimodal language models: duplication matters
more"): inside the LLM, after layer K, keep pivot tokens and the visual tokens least duplicated with them.

As released (ZichenWen1/DART, `get_retained_image_token` in its Llama model; the paper: arXiv 2502.11494), on the
output of layer K-1 (through the LLM's final norm) and that layer's cached keys (heads concatenated):

1. Pivots: the `pivot_image` visual tokens and the `pivot_text` text tokens after the image with the largest L1 norm
   of their keys (`pivot: key_norm`; `hidden_norm` ranks by the L1 norm of the normed hidden states instead).
2. For each pivot in turn, the visual tokens not yet kept whose hidden states are least cosine-similar to the pivot's
   are kept: `per_pivot` of them.
3. The LLM goes on from layer K with the text, the visual pivots and those tokens (original order and position ids).

Counts: as released, per_pivot = M // (pivot_image + pivot_text) with M = round(N * keep_ratio) (the released
max_num_trunction, 128 of 576 at its reduction ratio 0.778), so pivot_image + (pivot_image + pivot_text) * per_pivot
visual tokens stay (132 of 576). A fixed `tokens` keeps exactly that many instead: the visual pivots, and the rest
shared over the pivots in turn (the first ones take one more where it does not divide). Each row chooses its own
tokens (the released code reads row 0); the pivots are taken in position order (the released code walks a Python
set); where a prompt has fewer text tokens after the image than `pivot_text`, text before it fills in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ablate.api import (
    DECODER_PRUNING,
    ConfigError,
    DecoderPruning,
    LayerStates,
    ReducerConfig,
    StageContext,
    TokenReducer,
    check_prune_layer,
    hookimpl,
    positions_of,
    take_tokens,
)


@dataclass
class DARTConfig(ReducerConfig):
    layer: int = 2  # K: layers 0..K-1 see every visual token (released: K=2)
    keep_ratio: float = 0.222  # M = round(N * keep_ratio) tokens shared over the pivots (released: 1 - 0.778)
    tokens: int | None = None  # or exactly this many visual tokens kept from layer K on, pivots included
    pivot_image: int = 4  # visual pivot tokens (released: 4)
    pivot_text: int = 4  # text pivot tokens, after the image (released: 4)
    pivot: Literal["key_norm", "hidden_norm"] = "key_norm"  # what ranks pivots: L1 norm of the keys (released)


class DART(TokenReducer):
    """DART: after LLM layer K, keep pivots and the visual tokens least similar to them (duplicates go)."""

    name = "dart"
    Config = DARTConfig
    prunes_in_decoder = True

    def __init__(self, config: DARTConfig):
        super().__init__(config)
        if config.layer < 1:
            raise ConfigError(f"reducer.layer={config.layer} must be at least 1 (DART reads layer K-1's states).")
        if not (math.isfinite(config.keep_ratio) and 0 < config.keep_ratio <= 1):
            raise ConfigError(f"reducer.keep_ratio={config.keep_ratio} must be in (0, 1] (0.222 as released).")
        if config.pivot_image < 0 or config.pivot_text < 0 or config.pivot_image + config.pivot_text < 1:
            raise ConfigError(
                f"reducer.pivot_image={config.pivot_image} and reducer.pivot_text={config.pivot_text} must be >= 0 "
                f"with at least one pivot (4 and 4 as released)."
            )
        if config.tokens is not None and config.tokens < config.pivot_image:
            raise ConfigError(
                f"reducer.tokens={config.tokens} is fewer than the reducer.pivot_image={config.pivot_image} visual "
                f"pivots it keeps: raise reducer.tokens or lower reducer.pivot_image."
            )

    def kept(self, count: int) -> int:
        """Visual tokens kept from layer K on, out of `count`."""
        config = self.config
        if config.tokens is not None:
            return config.tokens
        pivots = config.pivot_image + config.pivot_text
        return min(count, config.pivot_image + pivots * (round(count * config.keep_ratio) // pivots))

    def check_pipeline(self, encoder, connector, decoder) -> None:
        check_prune_layer(self.config.layer, decoder)
        received = self.input_layout(encoder, connector).num_tokens
        if self.config.pivot_image > received:
            raise ConfigError(
                f"reducer.pivot_image={self.config.pivot_image} but encoder '{encoder.name}' gives {received} tokens: "
                f"use at most {received} visual pivots."
            )
        super().check_pipeline(encoder, connector, decoder)

    def notes(self) -> list[str]:
        return [
            f"reducer '{self.name}' picks visual tokens from LLM layer {self.config.layer - 1}'s output and cached keys "
            f"(pivots by {self.config.pivot.replace('_', ' ')})."
        ]

    def forward(self, ctx: StageContext) -> StageContext:
        keep = self.kept(ctx.num_tokens)
        if keep > ctx.num_tokens:
            raise ValueError(f"reducer.tokens={keep} but only {ctx.num_tokens} visual tokens came in")
        config = self.config

        def select(states: LayerStates) -> torch.Tensor:
            return dart_select(states, keep, config.pivot_image, config.pivot_text, config.pivot)

        plan = DecoderPruning(layer=config.layer, keep=keep, select_states=select)
        return replace(ctx, extras={**ctx.extras, DECODER_PRUNING: plan})


def dart_select(states: LayerStates, keep: int, pivot_image: int, pivot_text: int, pivot: str) -> torch.Tensor:
    """DART's choice: (B, keep) indices into the visual tokens, ascending (see the module docstring)."""
    visual = states.visual_positions
    batch, length = states.hidden.shape[:2]
    ranking = (states.keys if pivot == "key_norm" else states.hidden).float().norm(p=1, dim=-1)  # (B, T)
    image_pivots = ranking.gather(1, visual).topk(pivot_image, dim=1).indices  # (B, P_i) into the visual tokens
    # Text pivots: the text after the image first; text before it fills in where a prompt has too little after.
    # (Shapes stay static, so that counting runs on the meta device.)
    is_text = torch.ones(batch, length, dtype=torch.bool, device=visual.device).scatter_(1, visual, False)
    after = torch.arange(length, device=visual.device)[None] > visual[:, -1:]
    text_ranking = torch.where(after, ranking, torch.full_like(ranking, -1e30)).masked_fill(~is_text, float("-inf"))
    text_pivots = text_ranking.topk(min(pivot_text, length - visual.shape[1]), dim=1).indices  # (B, P_t) positions
    pivots = torch.cat(
        [
            take_tokens(states.hidden, visual.gather(1, image_pivots.sort(dim=1).values)),
            take_tokens(states.hidden, text_pivots.sort(dim=1).values),
        ],
        dim=1,
    )  # in position order
    if pivots.shape[1] == 0:
        raise ValueError("DART needs at least one pivot: no visual pivots and no text after the image")
    unit = F.normalize(take_tokens(states.hidden, visual).float(), dim=-1)  # (B, N, D)
    unit_pivots = F.normalize(pivots.float(), dim=-1)
    rows = torch.arange(batch, device=visual.device)[:, None]
    taken = torch.zeros(visual.shape, dtype=torch.bool, device=visual.device)
    taken[rows, image_pivots] = True
    share, extra = divmod(keep - pivot_image, pivots.shape[1])
    for i in range(pivots.shape[1]):
        count = share + (i < extra)
        if count == 0:
            continue
        similarity = (unit @ unit_pivots[:, i, :, None])[..., 0].masked_fill(taken, float("inf"))
        taken[rows, (-similarity).topk(count, dim=1).indices] = True
    return positions_of(taken, keep)


@hookimpl
def register_reducers(register):
    register(DART)
