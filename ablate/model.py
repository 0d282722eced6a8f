"""Compose the four components into one `nn.Module` and splice image tokens into the prompt."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ablate.components import Connector, Decoder, EncoderOutput, TokenReducer, VisionEncoder
from ablate.config import VLMConfig, load_config
from ablate.errors import ConfigError, IncompatibleComponentsError
from ablate.registry import Registry, get_registry


class VLM(nn.Module):
    """pixels -> encoder -> reducer -> connector -> decoder prefill -> first-token logits.

    Every stage is a separate method so that it can be timed (or captured) on its own; `prefill` runs them all.
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
        image_token_id = config.image_token_id
        self.image_token_id = decoder.vocab_size - 1 if image_token_id is None else image_token_id
        if not 0 <= self.image_token_id < decoder.vocab_size:
            raise ConfigError(
                f"image_token_id={self.image_token_id} is outside the decoder's vocabulary "
                f"(0..{decoder.vocab_size - 1}). Leave image_token_id unset to use the last id."
            )

    # -------------------------------------------------------------------------------------- stages

    def encode(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return self.encoder(pixel_values.to(self.dtype))

    def reduce(self, features: EncoderOutput) -> EncoderOutput:
        return self.reducer(features)

    def connect(self, features: EncoderOutput) -> EncoderOutput:
        tokens = self.connector(features.tokens)
        grid = features.grid if tokens.shape[1] == features.tokens.shape[1] else None
        return features.replace(tokens=tokens, grid=grid)

    def prefill_with(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """LLM prefill over the prompt with its image placeholder replaced by `visual_embeds`."""
        return self.decoder(self.splice(visual_embeds, input_ids))

    def stages(self) -> list[tuple[str, Callable[[Any], Any]]]:
        """The vision-side stages in execution order: each takes the previous one's output."""
        if self.reducer.config.position == "after_connector":
            return [("encoder", self.encode), ("connector", self.connect), ("reducer", self.reduce)]
        return [("encoder", self.encode), ("reducer", self.reduce), ("connector", self.connect)]

    def visual_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out: Any = pixel_values
        for _, stage in self.stages():
            out = stage(out)
        return out.tokens

    def prefill(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels and (B, T) ids with one `image_token_id` each -> (B, vocab) first-token logits."""
        return self.prefill_with(self.visual_embeds(pixel_values), input_ids)

    forward = prefill

    # ------------------------------------------------------------------------------------- helpers

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def splice(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `input_ids` with each row's single image placeholder replaced by its visual tokens."""
        is_image = input_ids == self.image_token_id
        per_row = is_image.sum(dim=1)
        if not bool((per_row == 1).all()):
            raise ValueError(
                f"Each prompt must hold exactly one image placeholder (id {self.image_token_id}); "
                f"found {per_row.tolist()} per row."
            )
        if visual_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{visual_embeds.shape[0]} images for {input_ids.shape[0]} prompts")
        # Embedding the placeholder id is harmless: its row is cut out below.
        text = self.decoder.embed(input_ids)
        visual_embeds = visual_embeds.to(text.dtype)
        position = is_image.int().argmax(dim=1)
        if bool((position == position[0]).all()):  # the common case: one slice, no Python loop over rows
            p = int(position[0])
            return torch.cat([text[:, :p], visual_embeds, text[:, p + 1 :]], dim=1)
        rows = [
            torch.cat([text[i, :p], visual_embeds[i], text[i, p + 1 :]]) for i, p in enumerate(position.tolist())
        ]
        return torch.stack(rows)

    def make_prompt(self, prompt_tokens: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        """Synthetic prompt ids: the image placeholder, then `prompt_tokens` random text ids (LLaVA order)."""
        generator = torch.Generator().manual_seed(seed)
        high = max(self.decoder.vocab_size - 1, 1)
        text = torch.randint(0, high, (batch_size, prompt_tokens), generator=generator)
        text[text == self.image_token_id] = 0
        placeholder = torch.full((batch_size, 1), self.image_token_id, dtype=text.dtype)
        return torch.cat([placeholder, text], dim=1).to(self.device)

    def num_visual_tokens(self) -> int | None:
        """Tokens handed to the LLM for one image at the configured size (None if image-dependent)."""
        count: int | None = self.encoder.num_tokens()
        grid = _square_grid(count)
        for name, _ in self.stages()[1:]:
            if count is None:
                return None
            module = self.reducer if name == "reducer" else self.connector
            new = module.num_tokens(count, grid)
            grid = grid if new == count else None
            count = new
        return count

    def params(self) -> dict[str, int]:
        counts = {kind: _count(getattr(self, kind)) for kind in ("encoder", "reducer", "connector", "decoder")}
        counts["total"] = _count(self)
        return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _square_grid(count: int) -> tuple[int, int] | None:
    side = int(round(count**0.5))
    return (side, side) if side * side == count else None


def check_compatible(encoder: VisionEncoder, reducer: TokenReducer, config: VLMConfig) -> None:
    """Fail before anything runs when the reducer needs what the encoder cannot give."""
    missing = set(reducer.requires) - set(encoder.provides)
    if missing:
        raise IncompatibleComponentsError(
            f"Reducer '{reducer.name}' (reducer.name) needs {', '.join(sorted(missing))} from the encoder, but "
            f"encoder '{encoder.name}' (encoder.name) provides {', '.join(sorted(encoder.provides)) or 'nothing extra'}. "
            f"Pick an encoder that provides it (e.g. a ViT with a CLS token via encoder=timm), or a reducer "
            f"that does not need it (e.g. reducer=none)."
        )
    if reducer.needs_grid and _square_grid(encoder.num_tokens()) is None:
        raise IncompatibleComponentsError(
            f"Reducer '{reducer.name}' needs tokens on a 2-D grid; encoder '{encoder.name}' at "
            f"{config.encoder.image_size} px does not give a square grid. Use a square grid encoder setting."
        )


def build(
    config: str | VLMConfig | dict,
    overrides: Iterable[str] = (),
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    meta: bool = False,
    registry: Registry | None = None,
) -> VLM:
    """Build a VLM from a preset name, YAML path, dict or resolved config, plus `key=value` overrides.

    Weights are random unless the config names weights. `meta=True` builds on the meta device: shapes,
    parameter counts and FLOPs without allocating memory (7B configs on a laptop).
    """
    registry = registry or get_registry()
    config = load_config(config, overrides, registry)
    classes = {kind: registry.get(kind, getattr(config, kind).name) for kind in ("encoder", "reducer", "connector", "decoder")}
    with torch.device("meta") if meta else nullcontext():
        encoder = classes["encoder"](config.encoder)
        encoder.num_tokens()  # rejects an image size the encoder cannot take, before the big decoder is built
        reducer = classes["reducer"](config.reducer)
        check_compatible(encoder, reducer, config)
        encoder.request(frozenset(reducer.requires))
        decoder = classes["decoder"](config.decoder)
        connector = classes["connector"](config.connector, in_width=encoder.width, out_width=decoder.hidden_size)
        vlm = VLM(config, encoder, reducer, connector, decoder)
    if config.weights and not meta:
        from ablate.checkpoints import load_vlm_weights  # only needed with real weights

        load_vlm_weights(vlm, config.weights)
    if dtype is not None:
        vlm = vlm.to(dtype=dtype)
    if device is not None and not meta:
        vlm = vlm.to(device)
    return vlm.eval()
