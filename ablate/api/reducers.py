"""What token reducers share, so that a reducer plugin is its algorithm and nothing else: token scores (one `Score`
type), the index helpers of pruning and merging, and the check that an encoder offers the score a reducer asks for.
(The budget check, `reducer.tokens` against what arrives, is on the base class, `TokenReducer.check_pipeline`.)

Token scores rank tokens for PruMerge, PruMerge+ and VisionZip: the CLS attention the released methods use, and
documented substitutes for encoders without a CLS token (FastViTHD, SigLIP, ConvNeXt).

Every score is non-negative, (B, N) over the N visual tokens, and sums to at most 1 per row, so that it can both
rank the tokens and weight a merge on the scale of attention probabilities, as PruMerge's merge does. Attention
scores take the softmax over all tokens of the scored layer, prefix ones (CLS, registers) included, and read it at
the visual ones (what goes to the prefix is left out, as in the released methods):

    cls                 attention of the CLS query to each token (what the released methods use). Needs CLS and
                        ATTENTION.
    mean_query          the same with the mean of the visual tokens' queries in the CLS's place. Needs ATTENTION.
    attention_received  the attention each token receives, averaged over the visual queries (the column mean of
                        the softmax matrix; VisionZip's and vLLM's substitute for CLS-free encoders). Needs ATTENTION.
    mean_similarity     cosine similarity of each token to the mean token, mapped to [0, 1] by (1 + cos) / 2 and
                        normalised to sum to 1 (a pseudo-CLS from the features alone). Needs nothing.
    norm                each token's L2 norm, normalised to sum to 1. Needs nothing.

Attention scores use the queries and keys of the layer the encoder exposes (`ctx.attention`; the timm encoder's
`encoder.attention_block`, FastViT's last attention block), captured by a forward hook: the encoder keeps its own
attention kernel (SDPA), and the reducer computes the softmax rows it needs from q and k, timed in its own stage.
`heads="concat"` scores with one head over all channels (PruMerge as released: q·k over the full width, scaled by
width^-0.5); `heads="mean"` takes the softmax per head and averages the heads (VisionZip as released sums them; the
ranking is the same).

An encoder offers the scores whose needs its `provides` covers; a reducer asking for another one fails at build
time, listing those on offer. `auto` takes the first score the encoder offers in the order above (the released
methods' CLS attention, then the attention-based substitutes, then the feature-only ones), so one grid can sweep
encoders with and without a CLS token; the record says which (`choices`). A reducer declares
`score: Score = "cls"` in its Config, settles it with `pick_score` in `check_pipeline`, and requires
`SCORES[score]`.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

from ablate.api.components import ATTENTION, CLS, Decoder, StageContext, VisionEncoder
from ablate.api.errors import ConfigError, IncompatibleComponentsError

Heads = Literal["concat", "mean"]
Score = Literal["auto", "cls", "mean_query", "attention_received", "mean_similarity", "norm"]

# score -> what it needs from the encoder (the module docstring says what each one is), in the order `auto` prefers
SCORES: dict[str, frozenset[str]] = {
    "cls": frozenset({CLS, ATTENTION}),
    "mean_query": frozenset({ATTENTION}),
    "attention_received": frozenset({ATTENTION}),
    "mean_similarity": frozenset(),
    "norm": frozenset(),
}
assert set(SCORES) | {"auto"} == set(typing.get_args(Score)), "Score and SCORES name the same scores"


def offered_scores(encoder: VisionEncoder) -> list[str]:
    """The scores this encoder can give, from what it declares it provides."""
    return [name for name, needs in SCORES.items() if needs <= set(encoder.provides)]


def pick_score(reducer_name: str, score: str, encoder: VisionEncoder) -> str:
    """The score a reducer runs with: `score` itself, checked against what `encoder` offers, or for 'auto' the
    first score it offers. Raises IncompatibleComponentsError at build time, listing the scores on offer."""
    offered = offered_scores(encoder)
    if score == "auto" and offered:
        return offered[0]
    if score in offered:
        return score
    missing = ", ".join(sorted(SCORES.get(score, frozenset()) - set(encoder.provides)))
    raise IncompatibleComponentsError(
        f"Reducer '{reducer_name}' ranks tokens by the '{score}' score (reducer.score), which needs {missing} from "
        f"the encoder; encoder '{encoder.name}' as configured does not provide it. Scores it offers: "
        f"{', '.join(offered)}. Set reducer.score to one of them, or to auto for the best it offers (each is "
        f"described in ablate.api.reducers)."
    )


def context_score(ctx: StageContext) -> str:
    """'auto' settled by what a context holds (its CLS token, its attention), for a reducer run on its own, outside
    `ablate.build` (tests, notebooks), where no encoder was there to ask."""
    held = ({CLS} if ctx.cls is not None else set()) | ({ATTENTION} if ctx.attention is not None else set())
    return next(name for name, needs in SCORES.items() if needs <= held)


def check_prune_layer(layer: int, decoder: Decoder) -> None:
    """For a reducer that prunes inside the LLM after layer `layer` (K, as FastV and DART): a ConfigError unless
    layers K.. exist in `decoder` (one whose layer count is unknown, 0, passes)."""
    layers = decoder.num_layers
    if layers and layer >= layers:
        raise ConfigError(
            f"reducer.layer={layer} but decoder '{decoder.name}' has {layers} layers: prune after one of layers "
            f"1..{layers - 1}."
        )


def _split(ctx: StageContext, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Queries and keys as (B, h, T, d) float32 (h = 1 over all channels for 'concat'), and the prefix count."""
    if ctx.attention is None:
        raise ValueError("this score needs the encoder's attention (ctx.attention); the encoder gave none")
    q, k = ctx.attention.queries.float(), ctx.attention.keys.float()
    if heads == "concat":
        q, k = (t.transpose(1, 2).flatten(2).unsqueeze(1) for t in (q, k))
    prefix = ctx.attention.num_prefix_tokens
    if q.shape[2] - prefix != ctx.num_tokens:
        raise ValueError(
            f"the attention covers {q.shape[2] - prefix} visual tokens but the reducer got {ctx.num_tokens}: a stage "
            f"between the encoder and the reducer changed the token count"
        )
    return q, k, prefix


def _softmax_rows(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.softmax((queries @ keys.transpose(-1, -2)) * queries.shape[-1] ** -0.5, dim=-1)


def token_scores(ctx: StageContext, score: str, heads: Heads = "concat") -> torch.Tensor:
    """(B, N) float32 scores of the N visual tokens of `ctx` (see the module docstring)."""
    if score in ("cls", "mean_query", "attention_received"):
        q, k, prefix = _split(ctx, heads)
        if score == "cls":
            if prefix < 1:
                raise ValueError("the 'cls' score needs a CLS token first among the attention's prefix tokens")
            rows = _softmax_rows(q[:, :, :1], k)  # (B, h, 1, T)
        elif score == "mean_query":
            rows = _softmax_rows(q[:, :, prefix:].mean(dim=2, keepdim=True), k)
        else:
            rows = _softmax_rows(q[:, :, prefix:], k).mean(dim=2, keepdim=True)
        return rows[:, :, 0, prefix:].mean(dim=1)
    x = ctx.tokens.float()
    if score == "mean_similarity":
        similarity = F.cosine_similarity(x, x.mean(dim=1, keepdim=True), dim=-1)
        positive = (1 + similarity) / 2
    elif score == "norm":
        positive = x.norm(dim=-1)
    else:
        raise ValueError(f"unknown score {score!r}; scores: {', '.join(SCORES)}")
    return positive / positive.sum(dim=1, keepdim=True).clamp_min(torch.finfo(positive.dtype).tiny)


def merge_keys(ctx: StageContext, heads: Heads = "concat") -> torch.Tensor:
    """(B, N, D) vectors whose cosine similarity decides merges: the scored layer's keys of the visual tokens (heads
    concatenated for 'concat', averaged for 'mean'), or the tokens themselves when there is no attention."""
    if ctx.attention is None:
        return ctx.tokens
    keys = ctx.attention.keys[:, :, ctx.attention.num_prefix_tokens :]
    return keys.transpose(1, 2).flatten(2) if heads == "concat" else keys.mean(dim=1)


# ------------------------------------------------------------------------------------------ index helpers


def take_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens at (B, ...) indices into N -> (B, ..., C): each row's tokens picked by its own indices."""
    flat = index.flatten(1)
    picked = tokens.gather(1, flat[..., None].expand(-1, -1, tokens.shape[-1]))
    return picked.view(*index.shape, tokens.shape[-1])


def positions_of(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(..., N) boolean mask with `count` True entries per row -> (..., count) their positions, ascending.

    A stable sort puts the True positions first in their original order, so shapes stay static: it runs on the meta
    device and inside a CUDA graph, where `nonzero` cannot (its output size depends on the data)."""
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :count]
