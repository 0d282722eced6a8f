"""The image size an encoder runs at when its config leaves the choice to ablate, so that one sweep spans encoders of
different strides and patch sizes:

    encoder.image_size_fit=nearest   an image size the encoder cannot take becomes the nearest one it can (CLIP
                                     ViT-L/14 at 256 px runs at 252); ties go to the larger size.
    encoder.target_tokens=N          the image size that gives exactly N visual tokens (FastViTHD: 1024 px for 256
                                     tokens, ConvNeXt: 512, ViT-L/14: 224), for equal-token comparisons.

`ablate.build` applies it; the record keeps the config as asked and says what ran in `choices`
({"encoder.image_size": 252}) and in a note. Sizes are tried on the meta device: nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ablate.api.components import EncoderConfig, VisionEncoder
from ablate.api.errors import ConfigError, ImageSizeError
from ablate.api.weights import meta_device

FARTHEST_SEARCH = 256  # px either side of the asked size searched when an encoder names no valid sizes itself


def tokens_at(encoder_class: type, config: EncoderConfig, size: int, input_size: Any = None) -> int:
    """Visual tokens of the encoder rebuilt at `size` (fixed-size ViTs must be rebuilt), on the meta device; an
    ImageSizeError when it cannot take it. Each answer is kept for the process: a grid asks the same ones often."""
    sized = dataclasses.replace(config, image_size=size)
    key = (encoder_class, json.dumps(dataclasses.asdict(sized), sort_keys=True, default=str), str(input_size))
    if key not in _TOKENS:
        try:
            with meta_device():
                encoder = encoder_class(sized)
            encoder.input_size = input_size
            _TOKENS[key] = encoder.num_tokens()
        except ImageSizeError as exc:
            _TOKENS[key] = exc
    if isinstance(_TOKENS[key], ImageSizeError):
        raise _TOKENS[key]
    return _TOKENS[key]


_TOKENS: dict[tuple, int | ImageSizeError] = {}


def nearest_size(
    encoder_class: type, config: EncoderConfig, input_size: Any = None, valid: tuple[int, ...] = ()
) -> int:
    """`config.image_size` if the encoder takes it, else the nearest size it takes (ties: the larger). `valid`: the
    sizes the encoder's ImageSizeError named, tried first."""
    size = config.image_size
    try:
        tokens_at(encoder_class, config, size, input_size)
        return size
    except ImageSizeError as exc:
        valid = valid or exc.valid
    named = sorted(valid, key=lambda s: (abs(s - size), -s))
    candidates = named or [s for d in range(1, FARTHEST_SEARCH + 1) for s in (size + d, size - d) if s > 0]
    for candidate in candidates:
        try:
            tokens_at(encoder_class, config, candidate, input_size)
            return candidate
        except ImageSizeError:
            continue
    raise ConfigError(
        f"Encoder '{config.name}' takes no image size within {FARTHEST_SEARCH} px of {size} "
        f"(encoder.image_size_fit=nearest). Set encoder.image_size to a size it takes."
    )


def size_for_tokens(encoder_class: type, config: EncoderConfig, tokens: int, input_size: Any = None) -> int:
    """The image size that gives exactly `tokens` visual tokens: a square grid, side = sqrt(tokens) times the
    encoder's stride, read off the nearest valid size to the configured one. ConfigError naming the counts it can
    give when none does."""
    reference = nearest_size(encoder_class, config, input_size)
    count = tokens_at(encoder_class, config, reference, input_size)
    side, wanted = math.isqrt(count), math.isqrt(max(tokens, 0))
    if tokens < 1 or wanted * wanted != tokens or side * side != count or reference % side:
        raise ConfigError(
            f"encoder.target_tokens={tokens}: an image size for a token count needs a square count on a square grid; "
            f"encoder '{config.name}' at {reference} px gives {count} tokens. Pick a square count (e.g. "
            f"{max(1, wanted) ** 2} or {(wanted + 1) ** 2})."
        )
    stride = reference // side
    candidate = stride * wanted
    try:
        if tokens_at(encoder_class, config, candidate, input_size) == tokens:
            return candidate
    except ImageSizeError:
        pass
    raise ConfigError(
        f"encoder.target_tokens={tokens}: no image size gives encoder '{config.name}' exactly {tokens} tokens "
        f"({candidate} px does not); its stride is {stride} px, so square counts k*k at k*{stride} px."
    )


def fitted_size(encoder: VisionEncoder, input_size: Any = None) -> tuple[int | None, str]:
    """The image size the built `encoder` should run at instead of its configured one (None: as configured, or
    the configured size's own ImageSizeError under 'exact'), and a sentence saying why. `input_size`: the raw
    image's (width, height), for encoders that count by it."""
    config = encoder.config
    if config.target_tokens is not None:
        size = size_for_tokens(type(encoder), config, config.target_tokens, input_size)
        tokens = config.target_tokens
        return size, f"encoder.image_size ran at {size} px: the size that gives {tokens} visual tokens (target_tokens)."
    if config.image_size_fit == "exact":
        return None, ""
    try:
        encoder.num_tokens()
        return None, ""
    except ImageSizeError as exc:
        size = nearest_size(type(encoder), config, input_size, exc.valid)
    return size, (
        f"encoder.image_size ran at {size} px: the nearest size encoder '{config.name}' takes to the "
        f"{config.image_size} px asked (image_size_fit)."
    )
