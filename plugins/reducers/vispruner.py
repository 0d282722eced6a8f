"""VisPruner (Zhang et al., ICCV 2025): important tokens by the CLS attention, then diverse ones among the rest.

As released (Theia-4869/VisPruner, `encode_images` in `llava/model/llava_arch.py`; the paper: arXiv 2412.01818), at a
budget `tokens` = important + diverse:

1. Important: the int(tokens * important_ratio) tokens with the highest CLS attention (per head, averaged over heads;
   `ablate.api.reducers`' 'cls' score with heads='mean'), the README's ratio 0.5 by default.
2. Diverse: the other tokens, in descending score order, lose near-duplicates until `diverse` are left. Each round
   splits them into alternate halves A (even places) and B (odd places), scores each A token by its highest cosine
   similarity to a B token (on the encoder's features), drops the min(8, left - diverse) highest-scoring A tokens, and
   goes on with the remaining A tokens (in descending score order) followed by B.
3. Output: the important and the diverse tokens, in their original order (the released index mask).

Encoders without a CLS token take a substitute score (`reducer.score`, as PruMerge and VisionZip do); rows are
independent. Where the released code indexes past its A half (more to drop in a round than A holds) it drops all of A;
the count still comes out exact, as it does there.
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
    pick_score,
    take_tokens,
    token_scores,
)

DROPPED_PER_ROUND = 8  # hard-coded in the released loop


@dataclass
class VisPrunerConfig(ReducerConfig):
    tokens: int = 64  # important + diverse tokens the LLM receives
    important_ratio: float = 0.5  # share of `tokens` chosen by attention (the README's example: 0.5)
    # What ranks the important tokens (ablate.api.reducers). auto: the CLS attention the released code uses, when the
    # encoder has a CLS token, else the best substitute it offers (recorded in the record's `choices`).
    score: Score = "auto"


class VisPruner(TokenReducer):
    """VisPruner: important tokens by CLS attention plus diverse tokens left after removing near-duplicates."""

    name = "vispruner"
    Config = VisPrunerConfig

    def __init__(self, config: VisPrunerConfig):
        super().__init__(config)
        if not (math.isfinite(config.important_ratio) and 0 <= config.important_ratio <= 1):
            raise ConfigError(f"reducer.important_ratio={config.important_ratio} must be in [0, 1] (0.5 as released).")
        self.score = None if config.score == "auto" else config.score  # settled against the encoder at build time

    @property
    def important(self) -> int:
        return int(self.config.tokens * self.config.important_ratio)

    def choices(self) -> dict[str, str]:
        return {"score": self.score} if self.config.score == "auto" else {}

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return SCORES.get(self.score, frozenset())  # 'auto' is settled by check_pipeline, before this is read

    def check_pipeline(self, encoder, connector, decoder) -> None:
        self.score = pick_score(self.name, self.config.score, encoder)
        super().check_pipeline(encoder, connector, decoder)

    def output_layout(self, layout):
        return TokenLayout.unstructured(self.config.tokens, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        tokens = self.config.tokens
        if tokens > ctx.num_tokens:
            raise ValueError(f"reducer.tokens={tokens} but only {ctx.num_tokens} tokens came in")
        scores = token_scores(ctx, self.score or context_score(ctx), heads="mean")
        order = scores.argsort(dim=1, descending=True)
        important, rest = order[:, : self.important], order[:, self.important :]
        rest = drop_duplicates(F.normalize(ctx.tokens.float(), dim=-1), rest, tokens - self.important)
        kept = torch.cat([important, rest], dim=1).sort(dim=1).values
        layout = TokenLayout.unstructured(tokens, ctx.layout.image_size)
        return replace(ctx, tokens=take_tokens(ctx.tokens, kept), layout=layout, attention=None, cls=None)


def drop_duplicates(unit: torch.Tensor, rest: torch.Tensor, diverse: int) -> torch.Tensor:
    """VisPruner's rounds of matching and pruning: (B, R) indices into the L2-normalised (B, N, C) tokens -> (B, diverse)."""
    if diverse == 0:
        return rest[:, :0]
    while rest.shape[1] > diverse:
        a, b = rest[:, ::2], rest[:, 1::2]
        drop = min(DROPPED_PER_ROUND, rest.shape[1] - diverse, a.shape[1])
        similarity = (take_tokens(unit, a) @ take_tokens(unit, b).transpose(1, 2)).amax(dim=2)  # (B, |A|)
        distinct = similarity.argsort(dim=1, descending=True)[:, drop:]
        rest = torch.cat([a.gather(1, distinct), b], dim=1)
    return rest


@hookimpl
def register_reducers(register):
    register(VisPruner)
