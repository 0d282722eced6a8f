"""The baseline every reducer must beat that is not a reducer stage: plain downsampling, the same encoder at the lower
image size that gives the same number of visual tokens (FastVLM's argument: FastViTHD at 256 px, 16 tokens).

    overrides = downsampled("fastvlm-0.5b", 64)      # [reducer=<the identity>, "encoder.image_size=512"]
    ablate.measure("fastvlm-0.5b", overrides)

A grid puts it beside the reducers as one more cell per budget (`downsampled` gives that cell's overrides).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ablate.api.errors import ConfigError
from ablate.api.registry import Registry, get_registry
from ablate.config.compose import load_config
from ablate.model.image_size import size_for_tokens


def image_size_for_tokens(
    config: Any, tokens: int, overrides: Iterable[str] = (), registry: Registry | None = None
) -> int:
    """The encoder image size that gives exactly `tokens` visual tokens (`ablate.model.image_size.size_for_tokens`:
    a square grid, side = sqrt(tokens) times the encoder's stride); ConfigError when none does."""
    registry = registry or get_registry()
    resolved = load_config(config, overrides, registry)
    encoder_class = registry.get("encoder", resolved.encoder.name)
    return size_for_tokens(encoder_class, resolved.encoder, tokens, resolved.input_size)


def downsampled(config: Any, tokens: int, overrides: Iterable[str] = (), registry: Registry | None = None) -> list[str]:
    """Overrides for the plain-downsampling baseline at `tokens` visual tokens: the identity reducer (the registered
    reducer that declares `passthrough`), and the image size that gives that many tokens."""
    registry = registry or get_registry()
    identity = next((name for name, cls in registry.components["reducer"].items() if cls.passthrough), None)
    if identity is None:
        raise ConfigError("Plain downsampling needs an identity reducer (passthrough = True); none is registered.")
    size = image_size_for_tokens(config, tokens, [*overrides, f"reducer={identity}"], registry)
    return [*overrides, f"reducer={identity}", f"encoder.image_size={size}"]
