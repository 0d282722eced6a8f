"""The small interfaces every plugin implements, and the one object that flows between stages.

A VLM here is four parts in a row:

    pixels -> VisionEncoder -> TokenReducer -> Connector -> Decoder (prefill) -> first-token logits

Each part is an `nn.Module` subclass with a class-level `name` (the registry key), a `Config` dataclass (its
options, with defaults; strict: unknown keys are errors) and a docstring whose first line is its description.
Encoders, reducers and connectors take a `StageContext` and return a new one (`dataclasses.replace`), changing only
what they own; the VLM hands it on. Plugins import these names from `ablate.api`, never from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ablate.api.config_typing import check_literals
from ablate.api.errors import ConfigError, ImageSizeError
from ablate.api.preprocessing import Preprocessing, preprocess
from ablate.api.weights import load_state_dict_strict, read_tensors

# Well-known extras a stage can ask for. The set is open: a plugin may provide and require any other name, and
# carry its value in `StageContext.extras[name]`.
CLS = "cls"  # StageContext.cls: the encoder's class token
ATTENTION = "attention"  # StageContext.attention: queries and keys of one attention layer, per head
TEXT = "text"  # StageContext.text_embeds: the prompt's token embeddings (the VLM provides it from the decoder)
WELL_KNOWN_EXTRAS = frozenset({CLS, ATTENTION, TEXT})
# ctx.extras key of a `DecoderPruning`: a reducer's order to drop visual tokens inside the decoder's prefill.
DECODER_PRUNING = "decoder_pruning"


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Crop:
    """One image view's tokens: a (rows, cols) grid, row-major.

    `tile` is the view's (row, col) in a tiling of the image (AnyRes crops); None for a view of the whole image.
    `newlines`: each grid row ends with one extra (image-newline) token, so the crop holds rows * (cols + 1) tokens.
    """

    grid: tuple[int, int]
    tile: tuple[int, int] | None = None
    newlines: bool = False

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return rows * (cols + self.newlines)


@dataclass(frozen=True)
class TokenLayout:
    """Where a row's visual tokens come from: crops (in token order), then `loose` tokens that lie on no grid.

    Loose tokens are what pruning and merging leave (no spatial order), summary tokens and the like. Every row of a
    batch shares one layout. `image_size` is the original image's (width, height), when known.
    """

    crops: tuple[Crop, ...] = ()
    loose: int = 0
    image_size: tuple[int, int] | None = None

    @classmethod
    def grid_of(cls, rows: int, cols: int, image_size: tuple[int, int] | None = None) -> TokenLayout:
        return cls(crops=(Crop((int(rows), int(cols))),), image_size=image_size)

    @classmethod
    def unstructured(cls, count: int, image_size: tuple[int, int] | None = None) -> TokenLayout:
        return cls(loose=int(count), image_size=image_size)

    @property
    def num_tokens(self) -> int:
        return sum(crop.num_tokens for crop in self.crops) + self.loose

    @property
    def grid(self) -> tuple[int, int] | None:
        """The grid when the tokens are exactly one plain crop (the common case), else None."""
        if len(self.crops) == 1 and not self.loose and not self.crops[0].newlines:
            return self.crops[0].grid
        return None

    def __str__(self) -> str:
        """For messages: 'one 24x24 grid', '10 crop(s) (27x27), 7290 tokens', '65 loose tokens'."""
        if self.grid:
            return f"one {self.grid[0]}x{self.grid[1]} grid"
        if not self.crops:
            return f"{self.loose} loose tokens"
        grids = ", ".join(dict.fromkeys(f"{c.grid[0]}x{c.grid[1]}" for c in self.crops))
        newlines = ", with newline tokens" if any(c.newlines for c in self.crops) else ""
        loose = f" + {self.loose} loose" if self.loose else ""
        return f"{len(self.crops)} crop(s) ({grids}{newlines}){loose}, {self.num_tokens} tokens"


# ---------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Attention:
    """Queries and keys of one attention layer, per head: (B, heads, T, head_dim) each.

    T counts every token that layer saw, prefix tokens (CLS, registers) first: T == num_prefix_tokens + N.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    num_prefix_tokens: int = 0


@dataclass(frozen=True)
class StageContext:
    """What flows from stage to stage. Each stage returns `dataclasses.replace(ctx, ...)` with what it changed.

    pixel_values: the encoder's input, (B, 3, H, W) (or what its `prepare` makes, e.g. a stack of crops).
    tokens:       (B, N, C) visual tokens; None before the encoder.
    layout:       where the N tokens come from (grid, crops, loose tokens) and the original image size.
    input_ids:    (B, T) prompt ids, one image placeholder per row.
    text_embeds:  (B, T, D) the prompt's token embeddings, when a stage asked for TEXT.
    cls:          (B, C) class token, when a stage asked for CLS.
    attention:    per-head queries and keys, when a stage asked for ATTENTION.
    extras:       anything else a plugin provides under its own name (read-only by convention: copy to change).
    """

    pixel_values: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    layout: TokenLayout = TokenLayout()
    input_ids: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    cls: torch.Tensor | None = None
    attention: Attention | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]


def square_grid(count: int) -> tuple[int, int] | None:
    side = int(round(count**0.5))
    return (side, side) if side * side == count else None


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class ComponentConfig:
    """Options every component has. Plugin configs subclass a kind's config."""

    name: str = "?"
    weights: str | None = None  # a local file or directory with this component's weights (never downloaded)


@dataclass
class EncoderConfig(ComponentConfig):
    image_size: int = 224
    # What happens to an image_size the encoder cannot take: 'exact' fails, naming the sizes it can take; 'nearest'
    # takes the nearest one (ties: the larger), recorded in the record's `choices` and notes.
    image_size_fit: Literal["exact", "nearest"] = "exact"
    # Run at the image size that gives exactly this many visual tokens (equal-token sweeps across encoders of
    # different strides); image_size then only tells the encoder's stride. None: run at image_size.
    target_tokens: int | None = None


@dataclass
class ReducerConfig(ComponentConfig):
    # Where the reducer sits: on encoder tokens, or on connector outputs (M3's code pools after the projector).
    position: Literal["before_connector", "after_connector"] = "before_connector"


@dataclass
class ConnectorConfig(ComponentConfig):
    pass


@dataclass
class DecoderConfig(ComponentConfig):
    pass


class Component(nn.Module):
    """What every model component shares: a registry name, a Config, and weights loaded from a local file."""

    kind: ClassVar[str]  # set by each base class: 'encoder', 'reducer', 'connector' or 'decoder'
    name: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        super().__init__()
        check_literals(config, self.kind)  # however the config was made (OmegaConf does not check Literal values)
        self.config = config

    @classmethod
    def resolve_config(cls, config: ComponentConfig) -> ComponentConfig:
        """Fill defaults that depend on other options (e.g. a timm model's native size) once, at config time."""
        return config

    @classmethod
    def named_values(cls) -> dict[str, dict[str, str]]:
        """Named values its options take, {option: {value: one-line description}} (e.g. a decoder's architectures):
        `ablate list KIND` lists them under the component."""
        return {}

    def convert_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This component's tensors in a layout it knows (a library's or a paper's release's key names) under its own
        state-dict keys. Default: as they are. `load_weights` and whole-VLM checkpoint formats both use it."""
        return tensors

    def load_weights(self, path: str) -> None:
        """Load `config.weights` (called by `ablate.build` after construction), strictly, through `convert_weights`."""
        tensors = self.convert_weights(read_tensors(path))
        load_state_dict_strict(self, tensors, f"{self.kind} '{self.name}' ({self.kind}.weights={path})")

    def notes(self) -> list[str]:
        """What a reader of the record must know about how this component runs as built (e.g. a slower attention
        path it needed, or where it reads attention from). Copied into `record["notes"]`."""
        return []

    def choices(self) -> dict[str, Any]:
        """Options this component settled itself where its config left the choice to it (e.g. `score: auto`), as
        {option: value used}; the record holds them under `choices` as `KIND.option`. Valid once built."""
        return {}


# ---------------------------------------------------------------------------------------------- encoder


class VisionEncoder(Component):
    """Base class of vision encoders: ctx.pixel_values -> ctx.tokens (+ layout, and extras when requested).

    Subclasses set `width` (token width) in `__init__`, implement `forward` and `num_tokens`, and override
    `preprocessing` (and `provides`, when they can give extras).
    """

    kind = "encoder"
    Config: ClassVar[type[EncoderConfig]] = EncoderConfig
    # Extras this encoder can deliver (CLS, ATTENTION, or any plugin-defined name); `request` switches them on.
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.width: int = 0
        self.requested: frozenset[str] = frozenset()
        self._input_size: tuple[int, int] | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """The raw image's (width, height) the model is configured for: the config's top-level `input_size` (set by
        `ablate.build`), else a square of `image_size`. Encoders whose output depends on the raw size and aspect
        (AnyRes tiling) declare their counts and input shape from it; the others resize and ignore it."""
        size = self.config.image_size
        return self._input_size or (size, size)

    @input_size.setter
    def input_size(self, size: tuple[int, int] | None) -> None:
        self._input_size = None if size is None else (int(size[0]), int(size[1]))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(image_size=self.config.image_size)

    def prepare(self, image) -> torch.Tensor:
        """A PIL image -> this encoder's pixel_values for one image (no batch dimension). Timed as preprocessing."""
        return preprocess(image, self.preprocessing)

    def input_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape of `pixel_values` for a batch (used to count FLOPs on the meta device)."""
        size = self.config.image_size
        return (batch_size, 3, size, size)

    def num_tokens(self, image_size: int | None = None) -> int:
        """Tokens for a square input of `image_size` (default: the configured size), without running the model.

        Raises ImageSizeError for sizes the encoder cannot take.
        """
        raise NotImplementedError

    def output_layout(self) -> TokenLayout:
        """The layout of the tokens at the configured size (default: a square grid, or loose tokens)."""
        count = self.num_tokens()
        grid = square_grid(count)
        return TokenLayout.grid_of(*grid) if grid else TokenLayout.unstructured(count)

    def request(self, needs: frozenset[str]) -> None:
        """Ask for extras in every later `forward`. Called once, at build time."""
        missing = set(needs) - set(self.provides)
        if missing:
            raise ValueError(f"{self.name} cannot provide {sorted(missing)}")
        self.requested = frozenset(needs)

    def forward(self, ctx: StageContext) -> StageContext:  # pragma: no cover - interface
        raise NotImplementedError


def check_multiple(encoder_name: str, image_size: int, multiple: int, key: str = "encoder.image_size") -> None:
    """Raise a helpful ImageSizeError unless image_size is a positive multiple of `multiple`."""
    if image_size > 0 and image_size % multiple == 0:
        return
    lower = max(multiple, (image_size // multiple) * multiple)
    upper = lower + multiple if lower < image_size else lower
    raise ImageSizeError(
        f"Encoder '{encoder_name}' cannot take image size {image_size} ({key}): it needs a positive multiple of "
        f"{multiple} (its total stride / patch size) so that its patches tile the image exactly. "
        f"Use {key}={lower}" + (f" or {key}={upper}" if upper != lower else "") + f", or {key.rpartition('.')[0]}."
        "image_size_fit=nearest to take the nearest size it can.",
        valid=(lower, upper),
    )


# ---------------------------------------------------------------------------------------------- reducer


class TokenReducer(Component):
    """Base class of token reducers: a StageContext with N tokens -> one with fewer (same width).

    A reducer with a budget takes `tokens` in its Config: the number of visual tokens the LLM receives (summary
    tokens included); the base class checks it against `min_tokens` when built and against `max_tokens` of what
    arrives before anything runs. A reducer that acts inside the LLM (FastV) leaves the tokens as they are and puts
    a `DecoderPruning` in `ctx.extras[DECODER_PRUNING]`; the VLM hands it to `Decoder.prefill_pruned`.
    """

    kind = "reducer"
    Config: ClassVar[type[ReducerConfig]] = ReducerConfig
    # Extras it needs (CLS, ATTENTION, TEXT, or plugin-defined). May be a property when it depends on the config.
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_grid: ClassVar[bool] = False  # True: the input must be one 2-D grid
    passthrough: ClassVar[bool] = False  # True only for the identity (no note that it leaves the LLM input as is)
    prunes_in_decoder: ClassVar[bool] = False  # True: it sends a DecoderPruning; the decoder must support it
    min_tokens: ClassVar[int] = 1  # the smallest budget it can give
    min_tokens_reason: ClassVar[str] = ""  # why, when more than 1 (for the error message)

    def __init__(self, config: ReducerConfig):
        super().__init__(config)
        budget = self.budget
        if budget is not None and budget < self.min_tokens:
            why = f" ({self.min_tokens_reason})" if self.min_tokens_reason else ""
            raise ConfigError(f"reducer.tokens={budget} must be at least {self.min_tokens}{why}.")

    @property
    def budget(self) -> int | None:
        """The visual tokens this reducer hands on (`reducer.tokens`); None: it has no budget, or decides by image."""
        return getattr(self.config, "tokens", None)

    def max_tokens(self, received: int) -> int:
        """The largest budget it can meet from `received` input tokens (default: as many as it receives)."""
        return received

    def output_layout(self, layout: TokenLayout) -> TokenLayout | None:
        """The layout out for `layout` in; None when the count depends on the image (adaptive methods)."""
        return layout

    def at_upper_bound(self, layout: TokenLayout) -> TokenReducer | None:
        """For a reducer whose count depends on the image (`output_layout` gives None): a stand-in that hands on the
        most tokens this one can make of `layout`, by the same steps, so that a run without an image (count-only, a
        dry run) gives tokens and FLOPs at that upper bound, labelled as such. None: no bound is known."""
        return None

    def check_pipeline(self, encoder: VisionEncoder, connector: Connector, decoder: Decoder) -> None:
        """Raise IncompatibleComponentsError or ConfigError, naming the options, when this reducer cannot run with
        these components (a budget the input cannot give, a score the encoder cannot give, a decoder layer that does
        not exist). Called by `ablate.build` before the generic checks (`requires`, `needs_grid`), so that its
        message wins, and before anything runs; the components may be on the meta device. The default checks the
        budget; an override that adds checks calls it too (`super().check_pipeline(...)`)."""
        received = self.input_layout(encoder, connector).num_tokens
        budget, most = self.budget, self.max_tokens(received)
        if budget is not None and budget > most:
            raise ConfigError(
                f"reducer.tokens={budget} is more than reducer '{self.name}' can make of the {received} tokens it "
                f"receives from encoder '{encoder.name}': use {self.min_tokens}..{most}."
            )

    def input_layout(self, encoder: VisionEncoder, connector: Connector) -> TokenLayout:
        """The layout this reducer receives: the encoder's, or the connector's output when it sits after it."""
        layout = encoder.output_layout()
        return connector.output_layout(layout) if self.config.position == "after_connector" else layout

    def forward(self, ctx: StageContext) -> StageContext:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- connector


class Connector(Component):
    """Base class of connectors: ctx.tokens (B, N, in_width) -> (B, N', out_width), with the layout to match.

    `in_width` and `out_width` come from the neighbouring encoder and decoder, never from the config.
    """

    kind = "connector"
    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig

    def __init__(self, config: ConnectorConfig, in_width: int, out_width: int):
        super().__init__(config)
        self.in_width = in_width
        self.out_width = out_width

    def output_layout(self, layout: TokenLayout) -> TokenLayout:
        """The layout out for `layout` in (default: unchanged, one output token per input token)."""
        return layout

    def forward(self, ctx: StageContext) -> StageContext:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class DecoderOutput:
    """logits: (B, vocab) for the token after the last position, or (B, T, vocab) when all were asked for.
    loss: the mean next-token cross-entropy over positions whose label is not -100, when labels were given.
    cache: the KV cache a prefill or decoding step wrote, for `Decoder.step` to go on with (None: not kept)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: Any = None


IGNORE_INDEX = -100  # label of positions that do not count in the loss (visual tokens, prompts), as in transformers


@dataclass(frozen=True)
class LayerStates:
    """What a decoder hands an in-LLM reducer that selects by the tokens' states (DART), after layer `layer - 1`.

    hidden:           (B, T, hidden) that layer's output through the decoder's final norm.
    keys:             (B, T, kv_heads * head_dim) that layer's keys as its KV cache holds them (after RoPE).
    visual_positions: (B, N) where each row's visual tokens sit among the T positions.
    """

    hidden: torch.Tensor
    keys: torch.Tensor
    visual_positions: torch.Tensor


@dataclass(frozen=True)
class DecoderPruning:
    """A reducer's order to drop visual tokens inside the decoder's prefill (FastV, DART): see `Decoder.prefill_pruned`.

    layer:  layers [0, layer) run over every token; layers [layer, L) over the text and the kept visual tokens.
    keep:   how many visual tokens each row keeps (known before the decoder runs, for token and FLOP counts).
    select: (B, heads, N) attention probabilities that the N visual tokens receive from the last position in layer
            `layer - 1` -> (B, keep) indices of the visual tokens to keep, each row sorted ascending.
    select_states: instead of `select`, a `LayerStates` of layer `layer - 1` -> the same (B, keep) indices.
    """

    layer: int
    keep: int
    select: Callable[[torch.Tensor], torch.Tensor] | None = None
    select_states: Callable[[LayerStates], torch.Tensor] | None = None


class Decoder(Component):
    """Base class of LLM decoders: embed token ids; run from `inputs_embeds` to logits (and a loss, for training).

    A decoder that can drop visual tokens inside its prefill (for in-LLM reducers such as FastV) sets
    `prunes_in_prefill = True` and implements `prefill_pruned`; the default prefill path stays as it is.

    A decoder that generates past the first token with a KV cache (`run.max_new_tokens`) sets `decodes = True`,
    returns its cache in the prefill's DecoderOutput, implements `step` and `cache_bytes`, and sets `num_kv_heads`
    and `head_dim`, from which the record computes the cache's size. To decode in compile and cudagraph modes it
    also implements `static_cache`: a cache of fixed shape that the prefill (`forward(..., cache=)`) fills and each
    `step` updates in place, so one compiled graph or one CUDA graph serves every step.
    """

    kind = "decoder"
    Config: ClassVar[type[DecoderConfig]] = DecoderConfig
    prunes_in_prefill: ClassVar[bool] = False
    decodes: ClassVar[bool] = False

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.hidden_size: int = 0
        self.vocab_size: int = 0
        self.num_layers: int = 0  # transformer layers (0: not known); in-LLM reducers check their layer against it
        self.num_kv_heads: int = 0  # key/value heads per layer (0: not known)
        self.head_dim: int = 0  # channels per key (and value) head (0: not known)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        all_logits: bool = False,
        cache: Any = None,
    ) -> DecoderOutput:  # pragma: no cover - interface
        """(B, T, hidden) -> DecoderOutput.

        Default (prefill): the first generated token's logits (B, vocab), writing the KV cache as generation would.
        `all_logits=True`: (B, T, vocab). `labels` (B, T): also the loss, with all logits (training). `cache`: a
        cache from `static_cache` to write the prefill into, from its first position on (whatever it held before is
        overwritten); None: a new cache of the decoder's own kind.
        """
        raise NotImplementedError

    def prefill_pruned(
        self,
        inputs_embeds: torch.Tensor,
        visual_positions: torch.Tensor,
        pruning: DecoderPruning,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:  # pragma: no cover - interface
        """The prefill (first-token logits, KV cache written) with visual tokens dropped after `pruning.layer` layers.

        visual_positions: (B, N) where each row's N visual tokens sit in `inputs_embeds` (the VLM's splice knows).
        After layer `pruning.layer - 1`, the decoder computes the attention probabilities that the visual tokens
        receive from the last position in that layer, per head, (B, heads, N), without changing the attention
        kernel the layer runs on; `pruning.select` picks the kept ones. The remaining layers run on the text and
        the kept visual tokens, which keep their original position ids (RoPE). With `pruning.select_states` the
        decoder hands that layer's `LayerStates` to it instead of computing the attention. Only decoders with
        `prunes_in_prefill = True` implement it.
        """
        raise NotImplementedError

    def step(
        self, input_ids: torch.Tensor, cache: Any, position: int | torch.Tensor
    ) -> DecoderOutput:  # pragma: no cover
        """One decoding step with the KV cache: (B, 1) ids of the last generated token, which sits at sequence
        `position` (its RoPE position; after in-LLM pruning the original one), and the cache the prefill or the
        previous step returned -> the next token's logits (B, vocab) and the cache with this token added. Unpadded
        rows only. Only decoders with `decodes = True` implement it. `position` is an int, or a (B, 1) long tensor
        on the ids' device (static decoding passes one, so that a compiled or captured step does not bake it in)."""
        raise NotImplementedError

    def static_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Any:
        """A KV cache of fixed shape holding `length` tokens per row, allocated now on `device`, or None when this
        decoder cannot decode into one (then compile and cudagraph modes decode eagerly, and say so)."""
        return None

    def cache_bytes(self, cache: Any) -> int:  # pragma: no cover - interface
        """Bytes the cache's key and value tensors hold (what `step` reads), as allocated."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------ checkpoint format


class CheckpointFormat:
    """A whole-VLM checkpoint layout (e.g. transformers' FastVLM): recognise a directory, describe its model as an
    ablate config, and map its tensors onto the built VLM's state-dict keys. The core reads the files and loads
    strictly; a format only knows names."""

    name: ClassVar[str]

    def detect(self, directory: Path, hf_config: dict[str, Any]) -> bool:
        """Whether this format reads `directory`, whose config.json parsed to `hf_config` (a dict)."""
        raise NotImplementedError

    def config(self, directory: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The ablate config (a plain dict: encoder, reducer, connector, decoder, ...) of the model stored there."""
        raise NotImplementedError

    def to_vlm_keys(self, tensors: dict[str, torch.Tensor], vlm: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
        """Checkpoint tensors renamed to the VLM's state-dict keys, and a hint added to a mismatch error ('' if none)."""
        raise NotImplementedError


# What the registry checks each registered class against, by kind.
COMPONENT_BASES: dict[str, type] = {
    **{base.kind: base for base in (VisionEncoder, TokenReducer, Connector, Decoder)},
    "checkpoint_format": CheckpointFormat,
}


def describe(component: type) -> str:
    """First line of a component's docstring: its one-line description in `ablate list`."""
    doc = (component.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
