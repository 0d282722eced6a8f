"""VisionZip (Yang et al., 2024): dominant tokens by attention, plus contextual tokens merged by key similarity.

Follows the released code (dvlab-research/VisionZip `visionzip/clip_encoder.py`; the paper: arXiv 2412.04467),
at a budget `tokens` = dominant + contextual:

1. Dominant: the CLS token itself and the `dominant - 1` visual tokens with the highest CLS attention, the softmax
   taken per head and summed over heads, in their original order (CLS first). Encoders without a CLS take a
   substitute score (`reducer.score`, `ablate.api.reducers`); then all `dominant` are visual tokens.
2. Contextual: among the remaining tokens (original order), `contextual` targets at a uniform stride
   (step = max(1, remaining // contextual), the first `contextual` of 0, step, 2 step, ...). Every other remaining
   token joins the target whose key (that layer's keys averaged over heads, L2-normalised; the tokens themselves
   without attention) is most similar; a contextual token is its target plus the mean of the tokens that joined.
3. Output: dominant tokens, then contextual tokens.

The released code reads the attention and keys of the layer that produces the features (CLIP layer -2, whose output
LLaVA uses): with the timm encoder set `encoder.attention_block` to `encoder.feature_block` (22 for LLaVA-1.5), as
the encoder's default is the next block (PruMerge's). The split defaults to the README's 54 + 10 for 64 tokens:
contextual = round(tokens * 10 / 64). Rows are independent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ablate.api import (
    CLS,
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
class VisionZipConfig(ReducerConfig):
    tokens: int = 64  # dominant + contextual tokens the LLM receives
    contextual: int | None = None  # None: round(tokens * 10 / 64), the README's 54 + 10 split
    # What picks the dominant tokens (ablate.api.reducers). auto: the CLS attention over heads the released code uses,
    # when the encoder has a CLS token, else the best substitute it offers (recorded in the record's `choices`).
    score: Score = "auto"


class VisionZip(TokenReducer):
    """VisionZip: dominant tokens by (per-head) attention plus similarity-merged contextual tokens, at a budget."""

    name = "visionzip"
    Config = VisionZipConfig

    def __init__(self, config: VisionZipConfig):
        super().__init__(config)
        if not 0 <= self.contextual < config.tokens:
            raise ConfigError(
                f"reducer.contextual={config.contextual} must be between 0 and reducer.tokens - 1 = {config.tokens - 1} "
                f"(at least one dominant token)."
            )
        self.score = None if config.score == "auto" else config.score  # settled against the encoder at build time

    def choices(self) -> dict[str, str]:
        return {"score": self.score} if self.config.score == "auto" else {}

    @property
    def contextual(self) -> int:
        config = self.config
        return round(config.tokens * 10 / 64) if config.contextual is None else config.contextual

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return SCORES.get(self.score, frozenset())  # 'auto' is settled by check_pipeline, before this is read

    def max_tokens(self, received: int) -> int:
        return received + (CLS in self.requires)  # the CLS token itself is one of the dominant tokens

    def check_pipeline(self, encoder, connector, decoder) -> None:
        self.score = pick_score(self.name, self.config.score, encoder)
        super().check_pipeline(encoder, connector, decoder)

    def output_layout(self, layout):
        return TokenLayout.unstructured(self.config.tokens, layout.image_size)

    def forward(self, ctx: StageContext) -> StageContext:
        score = self.score or context_score(ctx)  # None when called outside a built pipeline
        x = ctx.tokens
        batch, n, _ = x.shape
        scores = token_scores(ctx, score, heads="mean")
        uses_cls = score == "cls"
        dominant = self.config.tokens - self.contextual - uses_cls
        kept = scores.topk(dominant, dim=1).indices.sort(dim=1).values  # original order
        parts = [ctx.cls[:, None].to(x.dtype)] if uses_cls else []
        parts.append(take_tokens(x, kept))

        if self.contextual:
            remaining = torch.ones(batch, n, dtype=torch.bool, device=x.device).scatter_(1, kept, False)
            rest = positions_of(remaining, n - dominant)
            left = rest.shape[1]
            step = max(1, left // self.contextual)
            target = torch.arange(0, left, step, device=x.device)[: self.contextual]
            is_target = torch.zeros(left, dtype=torch.bool, device=x.device).index_fill_(0, target, True)
            others = positions_of(~is_target, left - len(target))
            keys = F.normalize(merge_keys(ctx, heads="mean").float(), dim=-1)
            rest_keys, rest_x = take_tokens(keys, rest), take_tokens(x, rest)
            similarity = rest_keys[:, others] @ rest_keys[:, target].transpose(1, 2)
            assign = F.one_hot(similarity.argmax(dim=2), len(target)).to(x.dtype)  # (B, others, contextual)
            counts = assign.sum(dim=1).clamp(min=1)[..., None]
            parts.append(rest_x[:, target] + assign.transpose(1, 2) @ rest_x[:, others] / counts)
        tokens = torch.cat(parts, dim=1)
        layout = TokenLayout.unstructured(tokens.shape[1], ctx.layout.image_size)
        return replace(ctx, tokens=tokens, layout=layout, attention=None, cls=None)


@hookimpl
def register_reducers(register):
    register(VisionZip)
