"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens, by max-min selection over cosine distances.

As released (vbdi/divprune, `DivPrune` in LLaVA's `llava_arch.py`; the paper: arXiv 2503.02175):

1. Distances: d(i, j) = 1 - cos(x_i, x_j) between every two visual tokens of a row.
2. First token: the one farthest from its nearest neighbour (the largest second-smallest distance in its column; the
   smallest is its distance to itself).
3. Then, until the budget is met: the token whose distance to the nearest token already kept is largest.
4. The kept tokens go on in their original order.

Budget: `tokens`, or as released a share of what arrives, round(keep_ratio * N) with the README's 0.098 (56 of
LLaVA-1.5's 576). The released code prunes the projected image features (the LLM's input), so the default position is
after the connector; `position: before_connector` selects on the encoder's features instead. Deviation, where the
released code would keep a token twice: a token already kept is never picked again (the two differ only when tokens
are exact duplicates). Rows are independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ablate.api import ConfigError, ReducerConfig, StageContext, TokenLayout, TokenReducer, hookimpl, take_tokens


@dataclass
class DivPruneConfig(ReducerConfig):
    tokens: int | None = None  # visual tokens kept; None: round(keep_ratio * N), as released
    keep_ratio: float = 0.098  # the README's SUBSET_RATIO (56 of 576)
    position: Literal["before_connector", "after_connector"] = "after_connector"  # released: projected features


class DivPrune(TokenReducer):
    """DivPrune: the most diverse tokens, by greedy max-min cosine distance."""

    name = "divprune"
    Config = DivPruneConfig

    def __init__(self, config: DivPruneConfig):
        super().__init__(config)
        if not (math.isfinite(config.keep_ratio) and 0 < config.keep_ratio <= 1):
            raise ConfigError(f"reducer.keep_ratio={config.keep_ratio} must be in (0, 1] (0.098 as released).")

    def kept(self, count: int) -> int:
        """Tokens kept out of `count`."""
        if self.config.tokens is not None:
            return self.config.tokens
        return max(1, int(round(self.config.keep_ratio * count)))

    def output_layout(self, layout):
        return TokenLayout.unstructured(self.kept(layout.num_tokens), layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        keep = self.kept(ctx.num_tokens)
        if keep > ctx.num_tokens:
            raise ValueError(f"reducer.tokens={keep} but only {ctx.num_tokens} tokens came in")
        kept = max_min_diverse(ctx.tokens, keep)
        layout = TokenLayout.unstructured(keep, ctx.layout.image_size)
        return replace(ctx, tokens=take_tokens(ctx.tokens, kept), layout=layout, attention=None, cls=None)


def max_min_diverse(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, keep) indices, ascending, of DivPrune's greedy max-min selection."""
    unit = F.normalize(tokens.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # (B, N, N)
    batch, n = tokens.shape[:2]
    rows = torch.arange(batch, device=tokens.device)
    self_pairs = torch.eye(n, dtype=torch.bool, device=tokens.device)
    first = distance.masked_fill(self_pairs, float("inf")).amin(dim=1).argmax(dim=1)  # farthest from its neighbour
    chosen = [first]
    nearest_kept = distance[rows, first]  # each token's distance to the nearest kept token
    taken = torch.zeros(batch, n, dtype=torch.bool, device=tokens.device)
    taken[rows, first] = True
    for _ in range(keep - 1):
        pick = nearest_kept.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(pick)
        taken[rows, pick] = True
        nearest_kept = torch.minimum(nearest_kept, distance[rows, pick])
    return torch.stack(chosen, dim=1).sort(dim=1).values


@hookimpl
def register_reducers(register):
    register(DivPrune)
