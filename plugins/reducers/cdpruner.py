"""CDPruner (Zhang et al., NeurIPS 2025): a conditional DPP over the visual tokens, relevance to the instruction as
quality, greedy MAP inference for a subset of `tokens`.

As released (Theia-4869/CDPruner, `encode_images` in `llava/model/llava_arch.py`; the paper: arXiv 2506.10967):

1. Similarity: S_ij = cos(x_i, x_j) of the projected visual tokens (the LLM's input), in float32.
2. Relevance: r_i = the mean over the instruction's embeddings t_m of -cos(e_i, t_m), then min-max normalised,
   (r - min r + 1e-6) / (max r - min r). The minus sign is the released code's.
3. Kernel: L_ij = r_i S_ij r_j.
4. Greedy MAP (the fast incremental Cholesky): d_i^2 = L_ii; each step takes j = argmax d^2, e = (L_j - c_j . C) / d_j,
   appends e to C, d^2 -= e^2, and never takes j again. The kept tokens go on in their original order.

The released LLaVA code compares CLIP's image embeddings with CLIP's text embeddings of the question. Here the VLM
provides the prompt's embeddings in the LLM's input space (`TEXT`: the decoder's token embeddings, the image
placeholder's among them), so relevance compares them with the visual tokens in that same space: the reducer sits
after the connector (`position`), where the tokens have the LLM's width. The released code normalises the relevance
over the whole batch (it runs at batch size 1); here each row on its own, so rows are independent. Where the kernel's
rank runs out (more tokens kept than the token width), the released code divides by a zero or negative d^2; here such
a step adds nothing to C, and a pick is always a token not yet taken, so the count stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ablate.api import (
    TEXT,
    ConfigError,
    ReducerConfig,
    StageContext,
    TokenLayout,
    TokenReducer,
    hookimpl,
    take_tokens,
)


@dataclass
class CDPrunerConfig(ReducerConfig):
    tokens: int = 64  # visual tokens kept
    position: Literal["before_connector", "after_connector"] = "after_connector"  # relevance needs the LLM's width


class CDPruner(TokenReducer):
    """CDPruner: conditional DPP (similarity weighted by relevance to the prompt), greedy MAP at a budget."""

    name = "cdpruner"
    Config = CDPrunerConfig
    requires = frozenset({TEXT})

    def check_pipeline(self, encoder, connector, decoder) -> None:
        if self.config.position == "before_connector" and encoder.width != decoder.hidden_size:
            raise ConfigError(
                f"reducer '{self.name}' compares visual tokens with the prompt's embeddings, which have the LLM's "
                f"width ({decoder.hidden_size}); before the connector the tokens of encoder '{encoder.name}' have "
                f"width {encoder.width}. Set reducer.position=after_connector (the default)."
            )
        super().check_pipeline(encoder, connector, decoder)

    def output_layout(self, layout):
        return TokenLayout.unstructured(self.config.tokens, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        tokens = self.config.tokens
        if tokens > ctx.num_tokens:
            raise ValueError(f"reducer.tokens={tokens} but only {ctx.num_tokens} tokens came in")
        if ctx.text_embeds is None:
            raise ValueError("cdpruner needs the prompt's embeddings (ctx.text_embeds); the VLM gives them for TEXT")
        kernel = conditional_kernel(ctx.tokens, ctx.text_embeds)
        kept = greedy_map(kernel, tokens)
        layout = TokenLayout.unstructured(tokens, ctx.layout.image_size)
        return replace(ctx, tokens=take_tokens(ctx.tokens, kept), layout=layout, attention=None, cls=None)


def conditional_kernel(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, N, C) visual tokens, (B, M, C) prompt embeddings -> (B, N, N) kernel r_i cos(x_i, x_j) r_j (float32)."""
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    relevance = -(unit @ F.normalize(text.float(), dim=-1).transpose(1, 2)).mean(dim=2)  # (B, N)
    low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
    relevance = (relevance - low + 1e-6) / (high - low).clamp_min(torch.finfo(relevance.dtype).tiny)
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def greedy_map(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, N, N) DPP kernel -> (B, keep) indices, ascending, of the greedy MAP subset (incremental Cholesky)."""
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d^2: what each token adds to the log-determinant
    factors = kernel.new_zeros(keep, batch, n)  # C: one row per step
    taken = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    chosen = []
    for step in range(keep):
        # argmax over the tokens not yet taken, whatever rounding left in their gains
        j = gains.nan_to_num(nan=-1e30, neginf=-1e30).clamp_min(-1e30).masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(j)
        taken[rows, j] = True
        gain = gains[rows, j]
        residual = kernel[rows, j] - torch.einsum("tb,tbn->bn", factors[:step, rows, j], factors[:step])
        factor = torch.where((gain > 0)[:, None], residual / gain.clamp_min(1e-30).sqrt()[:, None], 0.0)
        factors[step] = factor
        gains = gains - factor.square()
        gains[rows, j] = float("-inf")
    return torch.stack(chosen, dim=1).sort(dim=1).values


@hookimpl
def register_reducers(register):
    register(CDPruner)
