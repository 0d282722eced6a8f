"""FastV (Chen et al., 2024): drop visual tokens inside the LLM, after layer K, by the attention they receive.

As released (pkunlp-icler/FastV, its `modeling_llama.py`, `fastv_forward`; the paper: arXiv 2403.06764):
layers 0..K-1 run over every token; the attention map of layer K-1, averaged over heads, is read at the last
token's row over the visual positions; the top round(N * (1 - R)) visual tokens stay (here `keep_ratio` = 1 - R,
or a fixed number `tokens`), with all text tokens, and keep their original position ids. Only the prefill prunes.

This reducer leaves the tokens the LLM receives unchanged (the record says so, with the visual tokens per layer)
and sends the decoder a `DecoderPruning` through `ctx.extras`; the decoder implements it (`Decoder.prefill_pruned`,
e.g. hf-causal-lm runs its own layers and computes that one attention row beside SDPA). Each row of a batch chooses
its own tokens (the released code uses the first row's choice for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ablate.api import (
    DECODER_PRUNING,
    ConfigError,
    DecoderPruning,
    ReducerConfig,
    StageContext,
    TokenReducer,
    check_prune_layer,
    hookimpl,
)


@dataclass
class FastVConfig(ReducerConfig):
    layer: int = 2  # K: layers 0..K-1 see every visual token (the paper's title setting: K=2, R=50%)
    keep_ratio: float = 0.5  # share of the visual tokens kept from layer K on (FastV's R is 1 - keep_ratio)
    tokens: int | None = None  # or exactly this many visual tokens kept (overrides keep_ratio)


class FastV(TokenReducer):
    """FastV: after LLM layer K, keep the visual tokens the last token attends to most (a ratio or a count)."""

    name = "fastv"
    Config = FastVConfig
    prunes_in_decoder = True

    def __init__(self, config: FastVConfig):
        super().__init__(config)
        if config.layer < 1:
            raise ConfigError(
                f"reducer.layer={config.layer} must be at least 1 (FastV scores with layer K-1's attention)."
            )
        if not (math.isfinite(config.keep_ratio) and 0 < config.keep_ratio <= 1):
            raise ConfigError(f"reducer.keep_ratio={config.keep_ratio} must be in (0, 1].")

    def kept(self, count: int) -> int:
        """Visual tokens kept from layer K on, out of `count`."""
        if self.config.tokens is not None:
            return self.config.tokens
        return max(1, round(count * self.config.keep_ratio))

    def check_pipeline(self, encoder, connector, decoder) -> None:
        check_prune_layer(self.config.layer, decoder)
        super().check_pipeline(encoder, connector, decoder)

    def notes(self) -> list[str]:
        return [
            f"reducer '{self.name}' scores visual tokens by the attention the last position pays them in LLM layer "
            f"{self.config.layer - 1}, computed from that layer's queries and keys beside its own attention kernel "
            f"(SDPA unless decoder.attn_implementation says otherwise)."
        ]

    def forward(self, ctx: StageContext) -> StageContext:
        keep = self.kept(ctx.num_tokens)
        if keep > ctx.num_tokens:
            raise ValueError(f"reducer.tokens={keep} but only {ctx.num_tokens} visual tokens came in")
        plan = DecoderPruning(
            layer=self.config.layer, keep=keep, select=lambda attention: top_received(attention, keep)
        )
        return replace(ctx, extras={**ctx.extras, DECODER_PRUNING: plan})


def top_received(attention: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, heads, N) attention from the last position -> (B, keep) indices of the most attended, ascending."""
    return attention.mean(dim=1).topk(keep, dim=1).indices.sort(dim=1).values


@hookimpl
def register_reducers(register):
    register(FastV)
