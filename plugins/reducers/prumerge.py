"""LLaVA-PruMerge and PruMerge+ (Shang et al., 2024): keep the tokens the CLS token attends to most, merge the rest
in; PruMerge+ adds spatially spread tokens.

Follows the released code (42Shawn/LLaVA-PruMerge, `llava/model/multimodal_encoder/clip_encoder.py`:
`token_prune_merge_advanced` and `token_prune_merge_advanced_plus`; the paper: arXiv 2403.15388):

1. Score: CLS->token attention from one layer's queries and keys, one head over all channels (`ablate.api`'s
   `token_scores`, 'cls' with heads='concat'; the timm encoder reads block feature_block + 1, LLaVA's block 23).
2. How many to keep (adaptive, the default): the IQR outlier fence Q3 + 1.5 IQR over the scores of the whole
   batch (numpy percentiles in the released code: one fence per batch, so a row's output depends on the others),
   k = floor(N * outliers / (B * N)), counted in integers. The released code divides in float64 first, which is
   exact at N = 576; an earlier version here divided in float32 and kept one token fewer for 252 of the 576
   possible counts. A fixed budget `tokens=T` keeps T - 1 instead (no fence, rows independent), so comparisons
   can match token counts; with the summary token the LLM receives exactly T.
3. The k highest-scoring tokens, in descending score order.
4. Merge: each kept token adds the `k_nn` (32) tokens whose keys are most cosine-similar to its own, among all
   other tokens (kept or not), weighted by their raw scores: x_i + sum_j s_j x_j.
5. One summary token: the score-weighted sum of the tokens not kept. Output: k + 1 tokens.

PruMerge+ (adaptive) adds, after the k top tokens, the positions 0, s, 2s, ... < N - 1 of the flattened grid with
s = floor(floor(1 / ratio) / 3), ratio = outliers / (B * N), leaving out positions already kept. The released
code filters against the kept positions of the whole batch (and then only runs at batch size 1); here too, so
every row gets the same positions and the same count. With a budget T it keeps ceil((T - 1) / 2) tokens by score
and fills the rest of T - 1 with positions spread evenly over each row's remaining ones (the released training
path's half-and-half split, without duplicates); rows are independent.

Deviations, all where the released code would fail: at least one token is always kept (it keeps none, and
PruMerge+ divides by zero, when no score clears the fence); the stride is at least 1; k_nn is capped at N - 1.
Encoders without a CLS token take a substitute score (`reducer.score`, see `ablate.api.reducers`); merges then use
that layer's keys, or the tokens themselves when the score needs no attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ablate.api import (
    SCORES,
    ConfigError,
    ReducerConfig,
    Score,
    StageContext,
    TokenLayout,
    TokenReducer,
    context_score,
    hookimpl,
    merge_keys,
    pick_score,
    positions_of,
    take_tokens,
    token_scores,
)


@dataclass
class PruMergeConfig(ReducerConfig):
    tokens: int | None = None  # fixed budget (summary token included); None: adaptive, by the IQR fence
    # What ranks the tokens (ablate.api.reducers). auto: the CLS attention the released code uses, when the encoder
    # has a CLS token, else the best substitute it offers (recorded in the record's `choices`).
    score: Score = "auto"
    k_nn: int = 32  # neighbours merged into each kept token (hard-coded to 32 in the released code)
    iqr_factor: float = 1.5  # upper fence = Q3 + iqr_factor * IQR


class PruMerge(TokenReducer):
    """PruMerge: adaptive (IQR) or fixed-budget pruning by CLS attention, plus key-similarity merging."""

    name = "prumerge"
    Config = PruMergeConfig
    min_tokens = 2
    min_tokens_reason = "one kept token plus its summary token"

    def __init__(self, config: PruMergeConfig):
        super().__init__(config)
        if config.k_nn < 1:
            raise ConfigError(
                f"reducer.k_nn={config.k_nn} must be at least 1 (neighbours merged into each kept token)."
            )
        if not (math.isfinite(config.iqr_factor) and config.iqr_factor >= 0):
            raise ConfigError(f"reducer.iqr_factor={config.iqr_factor} must be a finite number >= 0 (1.5 as released).")
        self.score = None if config.score == "auto" else config.score  # settled against the encoder at build time

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return SCORES.get(self.score, frozenset())  # 'auto' is settled by check_pipeline, before this is read

    def check_pipeline(self, encoder, connector, decoder) -> None:
        self.score = pick_score(self.name, self.config.score, encoder)
        super().check_pipeline(encoder, connector, decoder)

    def output_layout(self, layout):
        if self.config.tokens is None:
            return None  # adaptive: decided per batch by the IQR fence
        return TokenLayout.unstructured(self.config.tokens, layout.image_size)

    def at_upper_bound(self, layout):
        if self.config.tokens is not None:
            return None  # a fixed budget needs no bound
        return type(self)(replace(self.config, tokens=self.most_kept(layout.num_tokens) + 1, score=self.score))

    def most_kept(self, n: int) -> int:
        """The most tokens the IQR fence can keep of n per row, for any batch: scores strictly above the fence lie
        above the linear 75th percentile, so at most ceil((n - 1) / 4) per row (and at least one is kept)."""
        return max(1, -(-(n - 1) // 4))

    def notes(self) -> list[str]:
        if self.config.tokens is None:
            return [f"reducer '{self.name}' decides its token count with one IQR fence over the whole batch."]
        return []

    def choices(self) -> dict[str, str]:
        return {"score": self.score} if self.config.score == "auto" else {}

    # ------------------------------------------------------------------------------------------- steps

    def outliers(self, scores: torch.Tensor) -> int:
        """How many scores of the whole batch lie above the IQR fence (numpy's linear percentiles, in float64)."""
        flat = scores.detach().double().flatten()
        q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=flat.dtype, device=flat.device))
        return int((flat > q3 + self.config.iqr_factor * (q3 - q1)).sum())

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, k) indices of the kept tokens, in the order they are output."""
        batch, n = scores.shape
        if self.config.tokens is not None:
            keep = self.config.tokens - 1
        else:
            keep = max(1, (self.outliers(scores) * n) // (batch * n))
        return scores.topk(keep, dim=1).indices

    def forward(self, ctx: StageContext) -> StageContext:
        score = self.score or context_score(ctx)  # None when called outside a built pipeline
        x = ctx.tokens  # (B, N, C), prefix tokens already dropped
        scores = token_scores(ctx, score, heads="concat")  # (B, N) float32
        kept = self.select(scores)
        keys = F.normalize(merge_keys(ctx, heads="concat").float(), dim=-1)
        tokens = merge(x, scores, keys, kept, self.config.k_nn)
        layout = TokenLayout.unstructured(tokens.shape[1], ctx.layout.image_size)
        return replace(ctx, tokens=tokens, layout=layout, attention=None)


def merge(x: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, k_nn: int) -> torch.Tensor:
    """PruMerge's token supplement: each kept token plus the score-weighted sum of its k_nn most key-similar other
    tokens, then one summary token of the tokens not kept. keys: L2-normalised (B, N, D). -> (B, k + 1, C)."""
    n = x.shape[1]
    similarity = take_tokens(keys, kept) @ keys.transpose(1, 2)  # (B, k, N)
    similarity.scatter_(2, kept[..., None], float("-inf"))  # a token is not its own neighbour
    neighbours = similarity.topk(min(k_nn, n - 1), dim=2).indices  # (B, k, k_nn)
    weights = scores.gather(1, neighbours.flatten(1)).view_as(neighbours).to(x.dtype)[..., None]
    merged = take_tokens(x, kept) + (weights * take_tokens(x, neighbours)).sum(dim=2)
    pruned = torch.ones_like(scores, dtype=torch.bool).scatter_(1, kept, False)
    summary = ((scores * pruned).to(x.dtype)[..., None] * x).sum(dim=1, keepdim=True)
    return torch.cat([merged, summary], dim=1)


class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially spread tokens (adaptive as released, or at a fixed budget)."""

    name = "prumerge-plus"

    def most_kept(self, n: int) -> int:
        """The top tokens plus the spread positions the fence's stride adds, at their largest over every possible
        outlier count (batch 1; the union never exceeds the n tokens)."""
        most = 0
        for outliers in range(1, super().most_kept(n) + 1):
            stride = max(1, (n // outliers) // 3)
            most = max(most, min(n, outliers + len(range(0, n - 1, stride))))
        return most

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        batch, n = scores.shape
        if self.config.tokens is not None:
            return spread_budget(scores, self.config.tokens - 1)
        outliers = self.outliers(scores)
        top = scores.topk(max(1, (outliers * n) // (batch * n)), dim=1).indices
        # released: step = int(1 / ratio), stride = int(step / 3), on a flattened index that never reaches N - 1
        stride = max(1, ((batch * n) // max(outliers, 1)) // 3)
        positions = torch.arange(0, n - 1, stride, device=scores.device)
        chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
        chosen[top.flatten()] = True  # kept anywhere in the batch, as the released filter reads idx.flatten()
        extra = positions[~chosen[positions]]
        return torch.cat([top, extra.expand(batch, -1)], dim=1)


def spread_budget(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """ceil(keep / 2) tokens by score, then the rest spread evenly over each row's remaining positions (ascending)."""
    batch, n = scores.shape
    top = scores.topk((keep + 1) // 2, dim=1).indices
    rest = keep - top.shape[1]
    if rest == 0:
        return top
    remaining = torch.ones_like(scores, dtype=torch.bool).scatter_(1, top, False)
    order = positions_of(remaining, n - top.shape[1])  # each row's remaining positions, ascending
    picks = (torch.arange(rest, device=scores.device) * (n - top.shape[1])) // rest
    return torch.cat([top, order[:, picks]], dim=1)


@hookimpl
def register_reducers(register):
    register(PruMerge)
    register(PruMergePlus)
