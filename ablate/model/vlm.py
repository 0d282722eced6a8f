"""The four components composed into one `nn.Module`, each stage its own method; image tokens spliced into the
prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ablate.api.components import (
    DECODER_PRUNING,
    IGNORE_INDEX,
    TEXT,
    Connector,
    Decoder,
    DecoderOutput,
    StageContext,
    TokenLayout,
    TokenReducer,
    VisionEncoder,
)
from ablate.api.errors import ConfigError
from ablate.api.hooks import KINDS
from ablate.config.compose import VLMConfig

# The timed stages, in the order of the default pipeline (a reducer after the connector swaps the middle two), and
# the component each one runs.
STAGES = ("encoder", "reducer", "connector", "prefill")
STAGE_COMPONENT = {"encoder": "encoder", "reducer": "reducer", "connector": "connector", "prefill": "decoder"}


class VLM(nn.Module):
    """pixels -> encoder -> reducer -> connector -> decoder prefill -> first-token logits.

    Every stage is a separate method taking and returning a StageContext, so that it can be timed (or captured) on
    its own; `prefill` runs them all. Stage boundaries are the one place where data changes dtype: each stage's
    input is converted to that component's dtype (see `input_dtype`), so components may run in different dtypes.
    """

    def __init__(
        self,
        config: VLMConfig,
        encoder: VisionEncoder,
        reducer: TokenReducer,
        connector: Connector,
        decoder: Decoder,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.reducer = reducer
        self.connector = connector
        self.decoder = decoder
        self.loaded_weights: list[str] = []  # what `build` loaded (see ablate.model.loading), for the record
        # What `build` chose where the config left it open ({"encoder.image_size": 252}), and a sentence for each.
        self.choices: dict[str, Any] = {}
        self.choice_notes: list[str] = []
        image_token_id = config.image_token_id
        self.image_token_id = decoder.vocab_size - 1 if image_token_id is None else image_token_id
        if not 0 <= self.image_token_id < decoder.vocab_size:
            raise ConfigError(
                f"image_token_id={self.image_token_id} is outside the decoder's vocabulary "
                f"(0..{decoder.vocab_size - 1}). Leave image_token_id unset to use the last id."
            )

    # -------------------------------------------------------------------------------------- stages

    def start(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, image_size: tuple[int, int] | None = None
    ) -> StageContext:
        """The context the first stage receives: pixels, prompt ids, and the original image's (width, height)."""
        return StageContext(pixel_values=pixel_values, input_ids=input_ids, layout=TokenLayout(image_size=image_size))

    def encode(self, ctx: StageContext) -> StageContext:
        return self.encoder(replace(ctx, pixel_values=_to(ctx.pixel_values, input_dtype(self.encoder))))

    def reduce(self, ctx: StageContext) -> StageContext:
        if TEXT in self.reducer.requires and ctx.text_embeds is None:  # a text-aware reducer pays for the lookup
            ctx = replace(ctx, text_embeds=self.decoder.embed(ctx.input_ids))
        return self.reducer(replace(ctx, tokens=_to(ctx.tokens, input_dtype(self.reducer))))

    def connect(self, ctx: StageContext) -> StageContext:
        return self.connector(replace(ctx, tokens=_to(ctx.tokens, input_dtype(self.connector))))

    def decode(
        self,
        ctx: StageContext,
        *,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> DecoderOutput:
        """The LLM over the prompt with its image placeholder replaced by the visual tokens.

        A reducer that prunes inside the LLM (ctx.extras[DECODER_PRUNING]) acts on the prefill only.
        """
        embeds, labels, attention_mask = self.splice(ctx.tokens, ctx.input_ids, ctx.text_embeds, labels, attention_mask)
        pruning = ctx.extras.get(DECODER_PRUNING)
        if pruning is None:
            return self.decoder(embeds, attention_mask=attention_mask, labels=labels, all_logits=all_logits)
        if labels is not None or all_logits:
            raise ConfigError(
                f"Reducer '{self.reducer.name}' prunes visual tokens inside the LLM's prefill, which gives the first "
                f"token's logits only: training or scoring every position needs another reducer (e.g. reducer=none)."
            )
        positions = self.visual_positions(ctx.input_ids, ctx.tokens.shape[1])
        return self.decoder.prefill_pruned(embeds, positions, pruning, attention_mask=attention_mask)

    def prefill_stage(self, ctx: StageContext) -> torch.Tensor:
        """The timed prefill: (B, vocab) logits of the first generated token."""
        return self.decode(ctx).logits

    def start_decoding(self, ctx: StageContext) -> tuple[torch.Tensor, Any, int]:
        """The prefill of `ctx` (the vision output) with its KV cache kept: the first generated ids (B, 1), the
        cache, and the sequence position the first of them takes when it is fed back."""
        out = self.decode(ctx)
        if out.cache is None:
            raise ConfigError(
                f"decoder '{self.decoder.name}' returned no KV cache from its prefill: it cannot generate past the "
                f"first token (run.max_new_tokens). Leave run.max_new_tokens at 0 for time to first token only."
            )
        return out.logits.argmax(dim=-1, keepdim=True), out.cache, ctx.input_ids.shape[1] - 1 + ctx.tokens.shape[1]

    def next_token(self, ids: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        """One greedy decoding step: (B, 1) ids at sequence `position` -> the next (B, 1) ids; the cache grows."""
        return self.decoder.step(ids, cache, position).logits.argmax(dim=-1, keepdim=True)

    def generate(self, ctx: StageContext, max_new_tokens: int) -> tuple[torch.Tensor, Any]:
        """Exactly `max_new_tokens` greedy tokens after the vision output `ctx` (B, N ids), with the KV cache and no
        stop at an end-of-sequence id (every run generates the same length), and the cache at the end: it holds
        the prefill's tokens and every generated one but the last (that one is never fed back)."""
        ids, cache, position = self.start_decoding(ctx)
        generated = [ids]
        for index in range(max_new_tokens - 1):
            ids = self.next_token(ids, cache, position + index)
            generated.append(ids)
        return torch.cat(generated, dim=1), cache

    def vision_stages(self) -> list[tuple[str, Callable[[StageContext], StageContext]]]:
        """The vision-side stages in execution order."""
        if self.reducer.config.position == "after_connector":
            return [("encoder", self.encode), ("connector", self.connect), ("reducer", self.reduce)]
        return [("encoder", self.encode), ("reducer", self.reduce), ("connector", self.connect)]

    def stages(self) -> list[tuple[str, Callable[[Any], Any]]]:
        """Every timed stage in order: each takes the previous one's output; the last returns logits."""
        return self.vision_stages() + [("prefill", self.prefill_stage)]

    def run_vision(self, ctx: StageContext) -> StageContext:
        for _, stage in self.vision_stages():
            ctx = stage(ctx)
        return ctx

    def visual_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) visual tokens as the LLM receives them."""
        ids = torch.full((pixel_values.shape[0], 1), self.image_token_id, device=pixel_values.device)
        return self.run_vision(self.start(pixel_values, ids)).tokens

    def prefill(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels and (B, T) ids with one `image_token_id` each -> (B, vocab) first-token logits."""
        return self.prefill_stage(self.run_vision(self.start(pixel_values, input_ids)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> DecoderOutput:
        """Training and evaluation entry: labels (B, T) aligned with input_ids give the loss (placeholder ignored)."""
        ctx = self.run_vision(self.start(pixel_values, input_ids))
        return self.decode(ctx, labels=labels, attention_mask=attention_mask, all_logits=all_logits)

    # ------------------------------------------------------------------------------------- helpers

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def splice(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        text: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prompt embeddings with each row's single image placeholder replaced by its N visual tokens.

        `text`: the prompt's embeddings if already computed. Labels get IGNORE_INDEX and the attention mask 1 at the
        visual positions, so all three stay aligned. `position`: the placeholder's index in every row, as
        `image_position` found it; then nothing waits for the device (CUDA graph capture).
        """
        if position is None:
            is_image = input_ids == self.image_token_id
            per_row = is_image.sum(dim=1)
            if not bool((per_row == 1).all()):
                raise ConfigError(
                    f"Each prompt must hold exactly one image placeholder (id {self.image_token_id}); found "
                    f"{per_row.tolist()} per row. Put one image_token_id in every prompt (see VLM.make_prompt)."
                )
        if visual.shape[0] != input_ids.shape[0]:
            raise ConfigError(f"{visual.shape[0]} images for {input_ids.shape[0]} prompts: give one image per prompt.")
        # Embedding the placeholder id is harmless: its row is cut out below.
        text = self.decoder.embed(input_ids) if text is None else text
        visual = visual.to(text.dtype)  # the decoder's input dtype: the last stage boundary
        n = visual.shape[1]
        fill = {
            "labels": (labels, lambda t: torch.full((t.shape[0], n), IGNORE_INDEX, dtype=t.dtype, device=t.device)),
            "mask": (attention_mask, lambda t: torch.ones((t.shape[0], n), dtype=t.dtype, device=t.device)),
        }
        if position is None:
            per_row_position = is_image.int().argmax(dim=1)
            if bool((per_row_position == per_row_position[0]).all()):  # the common case: one slice, no row loop
                position = int(per_row_position[0])
        if position is not None:

            def cut(t, middle):
                return torch.cat([t[:, :position], middle, t[:, position + 1 :]], dim=1)

            extra = [None if t is None else cut(t, make(t)) for t, make in fill.values()]
            return cut(text, visual), extra[0], extra[1]

        def rows(t, middle):
            return torch.stack(
                [torch.cat([t[i, :p], middle[i], t[i, p + 1 :]]) for i, p in enumerate(per_row_position.tolist())]
            )

        extra = [None if t is None else rows(t, make(t)) for t, make in fill.values()]
        return rows(text, visual), extra[0], extra[1]

    def visual_positions(self, input_ids: torch.Tensor, count: int) -> torch.Tensor:
        """(B, count) positions of each row's visual tokens in the spliced sequence (they replace the placeholder)."""
        start = (input_ids == self.image_token_id).int().argmax(dim=1, keepdim=True)
        return start + torch.arange(count, device=input_ids.device)

    def image_position(self, input_ids: torch.Tensor) -> int | None:
        """The image placeholder's index when every row holds exactly one, at the same index; None otherwise."""
        is_image = (input_ids == self.image_token_id).cpu()
        if not bool((is_image.sum(dim=1) == 1).all()):
            return None
        position = is_image.int().argmax(dim=1)
        return int(position[0]) if bool((position == position[0]).all()) else None

    def make_prompt(self, prompt_tokens: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        """Synthetic prompt ids: the image placeholder, then `prompt_tokens` random text ids (LLaVA order)."""
        generator = torch.Generator().manual_seed(seed)
        high = max(self.decoder.vocab_size - 1, 1)
        text = torch.randint(0, high, (batch_size, prompt_tokens), generator=generator)
        text[text == self.image_token_id] = 0
        placeholder = torch.full((batch_size, 1), self.image_token_id, dtype=text.dtype)
        return torch.cat([placeholder, text], dim=1).to(self.device)

    def declared_layouts(self) -> dict[str, TokenLayout | None]:
        """Each vision stage's output layout as the components declare it (None: decided by the image)."""
        layout: TokenLayout | None = self.encoder.output_layout()
        layouts = {"encoder": layout}
        for name, _ in self.vision_stages()[1:]:
            if layout is not None:
                layout = getattr(self, name).output_layout(layout)
            layouts[name] = layout
        return layouts

    def num_visual_tokens(self) -> int | None:
        """Tokens handed to the LLM for one image at the configured size (None if image-dependent)."""
        last = list(self.declared_layouts().values())[-1]
        return None if last is None else last.num_tokens

    def params(self) -> dict[str, int]:
        counts = {kind: _count(getattr(self, kind)) for kind in KINDS}
        counts["total"] = _count(self)
        return counts


def input_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a component computes in: its first floating-point parameter's (None: it has none, keep the input's)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def _to(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if tensor is None or dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
