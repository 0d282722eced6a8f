"""Token reducers that need nothing but the tokens themselves: the identity and the seeded random baseline."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ablate.api import ReducerConfig, StageContext, TokenLayout, TokenReducer, hookimpl


class NoReducer(TokenReducer):
    """Keep every token (the baseline)."""

    name = "none"
    passthrough = True

    def forward(self, ctx: StageContext) -> StageContext:
        return ctx


@dataclass
class RandomConfig(ReducerConfig):
    tokens: int = 64  # tokens kept
    seed: int = 0  # which ones: the same subset for every row and every call


class RandomKeep(TokenReducer):
    """Baseline: keep a seeded random subset of `tokens` tokens, in their original order."""

    name = "random"
    Config = RandomConfig

    def output_layout(self, layout):
        return TokenLayout.unstructured(self.config.tokens, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        n = ctx.num_tokens
        if self.config.tokens > n:
            raise ValueError(f"reducer.tokens={self.config.tokens} but only {n} tokens came in")
        generator = torch.Generator().manual_seed(self.config.seed)  # CPU: the same subset on every device
        kept = torch.randperm(n, generator=generator)[: self.config.tokens].sort().values.to(ctx.tokens.device)
        layout = TokenLayout.unstructured(self.config.tokens, ctx.layout.image_size)
        return replace(ctx, tokens=ctx.tokens[:, kept], layout=layout)


@hookimpl
def register_reducers(register):
    register(NoReducer)
    register(RandomKeep)
