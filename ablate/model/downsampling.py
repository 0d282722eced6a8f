"""The baseline every reducer must beat that is not a reducer stage: plain downsampling, the same encoder at the lower
image size that gives the same number of visual tokens (FastVLM's argument: FastViTHD at 256 px, 16 tokens).

    overrides = downsampled("fastvlm-0.5b", 64)      # [reducer=<the identity>, "encoder.image_size=512"]
    ablate.measure("fastvlm-0.5b", overrides)

A grid puts it beside the reducers as one more cell per budget (`downsampled` gives that cell's overrides).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import torch

from ablate.api.errors import ConfigError, ImageSizeError
from ablate.api.registry import Registry, get_registry
from ablate.config.compose import load_config


def image_size_for_tokens(
    config: Any, tokens: int, overrides: Iterable[str] = (), registry: Registry | None = None
) -> int:
    """The encoder image size that gives exactly `tokens` visual tokens (a square grid: side = sqrt(tokens) times
    the encoder's stride, read off its configured size); ConfigError naming the nearest counts when none does."""
    registry = registry or get_registry()
    resolved = load_config(config, overrides, registry)
    encoder_class = registry.get("encoder", resolved.encoder.name)

    @functools.cache
    def count(size: int) -> int:
        with torch.device("meta"):  # the encoder rebuilt at that size: fixed-size ViTs need it
            return encoder_class(dataclasses.replace(resolved.encoder, image_size=size)).num_tokens()

    size = resolved.encoder.image_size
    side, wanted = math.isqrt(count(size)), math.isqrt(tokens)
    if tokens < 1 or wanted * wanted != tokens or side * side != count(size) or size % side:
        raise ConfigError(
            f"Plain downsampling needs a square token count on a square grid: {tokens} tokens from encoder "
            f"'{resolved.encoder.name}' at {size} px ({count(size)} tokens) has no such size. Pick a square count."
        )
    candidate = size // side * wanted
    try:
        if count(candidate) == tokens:
            return candidate
    except ImageSizeError:
        pass
    raise ConfigError(
        f"No image size gives encoder '{resolved.encoder.name}' exactly {tokens} tokens ({candidate} px does not); "
        f"square counts at multiples of its {size // side} px stride are {', '.join(str(k * k) for k in range(1, side + 1))}."
    )


def downsampled(config: Any, tokens: int, overrides: Iterable[str] = (), registry: Registry | None = None) -> list[str]:
    """Overrides for the plain-downsampling baseline at `tokens` visual tokens: the identity reducer (the registered
    reducer that declares `passthrough`), and the image size that gives that many tokens."""
    registry = registry or get_registry()
    identity = next((name for name, cls in registry.components["reducer"].items() if cls.passthrough), None)
    if identity is None:
        raise ConfigError("Plain downsampling needs an identity reducer (passthrough = True); none is registered.")
    size = image_size_for_tokens(config, tokens, [*overrides, f"reducer={identity}"], registry)
    return [*overrides, f"reducer={identity}", f"encoder.image_size={size}"]
