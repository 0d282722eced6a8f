"""The small interfaces every component plugin implements.

A VLM here is four parts in a row:

    pixels -> VisionEncoder -> TokenReducer -> Connector -> Decoder (prefill) -> first-token logits

Each part is an `nn.Module` subclass with a class-level `name` (the registry key), a `Config` dataclass (its
options, with defaults; strict: unknown keys are errors) and a docstring whose first line is its description.
Plugins import only this module (and `ablate.hookimpl`), exactly as a third-party plugin would.
"""

from __future__ import annotations


from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ablate.errors import ImageSizeError

# What an encoder can hand to a reducer besides its tokens and their grid (see `EncoderOutput`).
CLS = "cls"
ATTENTION = "attention"  # queries and keys of one attention layer
CAPABILITIES = frozenset({CLS, ATTENTION})


# --------------------------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become `pixel_values` for an encoder (timm's pretrained-config idea)."""

    image_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # "pad": pad to a square with `pad_color`, then resize (LLaVA 'pad', FastVLM);
    # "squash": resize to a square ignoring aspect; "center_crop": resize shortest side, crop the centre.
    resize: Literal["pad", "squash", "center_crop"] = "pad"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    pad_color: tuple[int, int, int] = (0, 0, 0)


@dataclass
class EncoderOutput:
    """What an encoder returns. Reducers and connectors pass it along with fewer or wider tokens.

    tokens:  (B, N, C) visual tokens, row-major over `grid` when the tokens lie on one grid.
    grid:    (h, w) with h * w == N, or None once tokens no longer lie on a grid (e.g. after pruning).
    cls:     (B, C) class token, for encoders that have one and were asked for it.
    queries, keys: (B, T, D) of one attention layer over all T tokens that layer saw, prefix tokens first
             (`num_prefix_tokens` of them), for encoders asked for `ATTENTION`.
    """

    tokens: torch.Tensor
    grid: tuple[int, int] | None
    cls: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    num_prefix_tokens: int = 0

    def replace(self, **changes) -> EncoderOutput:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return EncoderOutput(**values)


@dataclass
class EncoderConfig:
    """Options every encoder has. Plugin configs subclass this."""

    name: str = "?"
    image_size: int = 224
    weights: str | None = None  # local file with encoder-only weights (safetensors preferred)


class VisionEncoder(nn.Module):
    """Base class of vision encoders.

    Subclasses set `width` (token width) in `__init__`, implement `forward` and `preprocessing`, and
    override `num_tokens` (and, when they can, `provides`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[EncoderConfig]] = EncoderConfig
    # Which of CAPABILITIES this encoder can deliver; `request` switches them on.
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.width: int = 0
        self.requested: frozenset[str] = frozenset()

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(image_size=self.config.image_size)

    def num_tokens(self, image_size: int | None = None) -> int:
        """Tokens for a square input of `image_size` (default: the configured size).

        Raises ImageSizeError for sizes the encoder cannot take.
        """
        raise NotImplementedError

    def request(self, needs: frozenset[str]) -> None:
        """Ask for extras (CLS, attention) in every later `forward`. Called once, at build time."""
        missing = set(needs) - set(self.provides)
        if missing:
            raise ValueError(f"{self.name} cannot provide {sorted(missing)}")
        self.requested = frozenset(needs)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError


def check_multiple(encoder_name: str, image_size: int, multiple: int, key: str = "encoder.image_size") -> None:
    """Raise a helpful ImageSizeError unless image_size is a positive multiple of `multiple`."""
    if image_size > 0 and image_size % multiple == 0:
        return
    lower = max(multiple, (image_size // multiple) * multiple)
    upper = lower + multiple if lower < image_size else lower
    raise ImageSizeError(
        f"Encoder '{encoder_name}' cannot take image size {image_size} ({key}): it needs a multiple of "
        f"{multiple} (its total stride / patch size) so that its patches tile the image exactly. "
        f"Use {key}={lower}" + (f" or {key}={upper}." if upper != lower else ".")
    )


# --------------------------------------------------------------------------------------------- reducer


@dataclass
class ReducerConfig:
    name: str = "?"
    # Where the reducer sits: on encoder tokens, or on connector outputs (M3 pools after the projector).
    position: Literal["before_connector", "after_connector"] = "before_connector"


class TokenReducer(nn.Module):
    """Base class of token reducers: map an EncoderOutput to one with fewer tokens."""

    name: ClassVar[str]
    Config: ClassVar[type[ReducerConfig]] = ReducerConfig
    requires: ClassVar[frozenset[str]] = frozenset()  # subset of CAPABILITIES
    needs_grid: ClassVar[bool] = False

    def __init__(self, config: ReducerConfig):
        super().__init__()
        self.config = config

    def num_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int | None:
        """Tokens out for `num_tokens` in; None when the count depends on the image (adaptive methods)."""
        return num_tokens

    def forward(self, features: EncoderOutput) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- connector


@dataclass
class ConnectorConfig:
    name: str = "?"


class Connector(nn.Module):
    """Base class of connectors: (B, N, in_width) -> (B, N', out_width).

    `in_width` and `out_width` come from the neighbouring encoder and decoder, never from the config.
    """

    name: ClassVar[str]
    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig

    def __init__(self, config: ConnectorConfig, in_width: int, out_width: int):
        super().__init__()
        self.config = config
        self.in_width = in_width
        self.out_width = out_width

    def num_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return num_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- decoder


@dataclass
class DecoderConfig:
    name: str = "?"
    weights: str | None = None


class Decoder(nn.Module):
    """Base class of LLM decoders: embed token ids, and prefill from `inputs_embeds` to first-token logits."""

    name: ClassVar[str]
    Config: ClassVar[type[DecoderConfig]] = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.hidden_size: int = 0
        self.vocab_size: int = 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """(B, T, hidden) -> (B, vocab) logits of the token that follows the last position."""
        raise NotImplementedError


COMPONENT_BASES: dict[str, type[nn.Module]] = {
    "encoder": VisionEncoder,
    "reducer": TokenReducer,
    "connector": Connector,
    "decoder": Decoder,
}


def describe(component: type) -> str:
    """First line of a component's docstring: its one-line description in `ablate list`."""
    doc = (component.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""




__all__ = [
    "ATTENTION",
    "CAPABILITIES",
    "CLS",
    "COMPONENT_BASES",
    "Connector",
    "ConnectorConfig",
    "Decoder",
    "DecoderConfig",
    "EncoderConfig",
    "EncoderOutput",
    "Preprocessing",
    "ReducerConfig",
    "TokenReducer",
    "VisionEncoder",
    "check_multiple",
    "describe",
]
