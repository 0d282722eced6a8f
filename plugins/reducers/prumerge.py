"""LLaVA-PruMerge (Shang et al., 2024): keep the tokens the CLS token attends to most, merge the rest in.

Follows the released code (42Shawn/LLaVA-PruMerge `token_prune_merge_advanced`): CLS->patch attention from one
layer's queries and keys (one head over all channels), an IQR outlier fence over the whole batch picks how many
tokens to keep, each kept token absorbs its k nearest neighbours by key cosine weighted by their CLS attention,
and one extra token summarises the pruned ones. The token count therefore depends on the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ablate.components import ATTENTION, CLS, ReducerConfig, StageContext, TokenLayout, TokenReducer
from ablate.errors import ConfigError
from ablate.hookspecs import hookimpl


@dataclass
class PruMergeConfig(ReducerConfig):
    k_nn: int = 32  # neighbours merged into each kept token (hard-coded to 32 in the released code)
    iqr_factor: float = 1.5  # upper fence = Q3 + iqr_factor * IQR


class PruMerge(TokenReducer):
    """PruMerge: adaptive CLS-attention pruning plus key-similarity merging (needs CLS and attention)."""

    name = "prumerge"
    Config = PruMergeConfig
    requires = frozenset({CLS, ATTENTION})

    def __init__(self, config: PruMergeConfig):
        super().__init__(config)
        if config.k_nn < 1:
            raise ConfigError(
                f"reducer.k_nn={config.k_nn} must be at least 1 (neighbours merged into each kept token)."
            )
        if not (math.isfinite(config.iqr_factor) and config.iqr_factor >= 0):
            raise ConfigError(f"reducer.iqr_factor={config.iqr_factor} must be a finite number >= 0 (1.5 as released).")

    def output_layout(self, layout):
        return None  # adaptive: decided per batch by the IQR fence

    def forward(self, ctx: StageContext) -> StageContext:
        x = ctx.tokens  # (B, N, C), prefix tokens already dropped
        if ctx.attention is None or ctx.attention.num_prefix_tokens < 1:
            raise ValueError("PruMerge scores tokens by the CLS query: the encoder's attention has no prefix token")
        prefix = ctx.attention.num_prefix_tokens
        # The released code uses one "head" over all channels: concatenate the heads back. (B, P + N, D)
        q, k = (t.transpose(1, 2).flatten(2) for t in (ctx.attention.queries, ctx.attention.keys))
        scale = q.shape[-1] ** -0.5
        attention = torch.softmax((q[:, :1] @ k.transpose(1, 2)) * scale, dim=-1)[:, 0]
        cls_attention = attention[:, prefix:]  # (B, N)

        q1, q3 = torch.quantile(cls_attention.float().flatten(), torch.tensor([0.25, 0.75], device=x.device))
        fence = q3 + self.config.iqr_factor * (q3 - q1)
        ratio = (cls_attention > fence).float().mean()
        keep = max(1, int(x.shape[1] * ratio.item()))
        kept = cls_attention.topk(keep, dim=1).indices  # (B, keep)

        keys = F.normalize(k[:, prefix:], dim=-1)
        kept_keys = keys.gather(1, kept[..., None].expand(-1, -1, keys.shape[-1]))
        similarity = kept_keys @ keys.transpose(1, 2)  # (B, keep, N)
        similarity.scatter_(2, kept[..., None], float("-inf"))  # a token is not its own neighbour
        neighbours = similarity.topk(min(self.config.k_nn, x.shape[1] - 1), dim=2).indices  # (B, keep, knn)

        def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            flat = index.flatten(1)
            return values.gather(1, flat[..., None].expand(-1, -1, values.shape[-1])).view(*index.shape, -1)

        weights = cls_attention.gather(1, neighbours.flatten(1)).view_as(neighbours)[..., None]
        merged = gather_rows(x, kept[..., None])[:, :, 0] + (weights * gather_rows(x, neighbours)).sum(dim=2)

        pruned = torch.ones_like(cls_attention, dtype=torch.bool).scatter_(1, kept, False)
        extra = ((cls_attention * pruned)[..., None] * x).sum(dim=1, keepdim=True)
        tokens = torch.cat([merged, extra], dim=1)
        layout = TokenLayout.unstructured(tokens.shape[1], ctx.layout.image_size)
        return replace(ctx, tokens=tokens, layout=layout, attention=None)


@hookimpl
def register_reducers(register):
    register(PruMerge)
