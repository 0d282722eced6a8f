"""ablate's public plugin API: everything a plugin may import, built-in or third-party alike.

    from ablate.api import EncoderConfig, StageContext, TokenLayout, VisionEncoder, hookimpl

A plugin implements a hook (`hookimpl`) that registers component classes (encoders, reducers, connectors,
decoders) or checkpoint formats, built on the base classes here. The shared machinery it may use: errors that the
CLI turns into one-paragraph messages, strict weight loading from local files, image preprocessing, the token
scores and index helpers of reducers, and lookups of other registered components (for composite ones, like AnyRes
around a tile encoder). Conformance suites for a plugin's own tests are in `ablate.api.testing` (needs pytest).

The names exported here (`__all__`) and the behaviour their docstrings describe are what stays stable between
minor versions; CONTRIBUTING.md ("The public plugin API and its stability") states the promise. Anything not
exported here (ablate's other modules, names starting with `_`) may change in any release.
"""

from __future__ import annotations

from ablate.api.components import (
    ATTENTION,
    CLS,
    DECODER_PRUNING,
    IGNORE_INDEX,
    KINDS,
    TEXT,
    WELL_KNOWN_EXTRAS,
    Attention,
    CheckpointFormat,
    Component,
    ComponentConfig,
    Connector,
    ConnectorConfig,
    Crop,
    Decoder,
    DecoderConfig,
    DecoderOutput,
    DecoderPruning,
    EncoderConfig,
    ReducerConfig,
    StageContext,
    TokenLayout,
    TokenReducer,
    VisionEncoder,
    check_multiple,
    square_grid,
)
from ablate.api.errors import (
    AblateError,
    CheckpointError,
    ConfigError,
    DataError,
    ImageSizeError,
    IncompatibleComponentsError,
    ResourceError,
    did_you_mean,
    first_line,
)
from ablate.api.hooks import hookimpl
from ablate.api.preprocessing import Preprocessing, preprocess
from ablate.api.reducers import (
    SCORES,
    Score,
    check_score,
    merge_keys,
    offered_scores,
    positions_of,
    take_tokens,
    token_scores,
)
from ablate.api.registry import get_registry
from ablate.api.saved_models import MODEL_TYPE as SAVED_MODEL_TYPE
from ablate.api.saved_models import saved_config
from ablate.api.weights import load_state_dict_strict, read_tensors, renamed_keys


def component_class(kind: str, name: str, key: str | None = None) -> type:
    """The class registered as `kind` (encoder, reducer, connector, decoder, checkpoint_format) under `name`; an
    UnknownComponentError naming the options (and the config `key`, when given) if there is none."""
    return get_registry().get(kind, name, key)


def component_config(kind: str, node, key: str) -> tuple[type, ComponentConfig]:
    """The class and typed, resolved Config of a component node ({name: NAME, ...}) that a composite component's
    own options hold at config key `key` (e.g. 'encoder.tile'), checked as strictly as a top-level component."""
    return get_registry().component_config(kind, node, key)


__all__ = [
    "ATTENTION",
    "CLS",
    "DECODER_PRUNING",
    "IGNORE_INDEX",
    "KINDS",
    "SAVED_MODEL_TYPE",
    "SCORES",
    "TEXT",
    "WELL_KNOWN_EXTRAS",
    "AblateError",
    "Attention",
    "CheckpointError",
    "CheckpointFormat",
    "Component",
    "ComponentConfig",
    "ConfigError",
    "Connector",
    "ConnectorConfig",
    "Crop",
    "DataError",
    "Decoder",
    "DecoderConfig",
    "DecoderOutput",
    "DecoderPruning",
    "EncoderConfig",
    "ImageSizeError",
    "IncompatibleComponentsError",
    "Preprocessing",
    "ReducerConfig",
    "ResourceError",
    "Score",
    "StageContext",
    "TokenLayout",
    "TokenReducer",
    "VisionEncoder",
    "check_multiple",
    "check_score",
    "component_class",
    "component_config",
    "did_you_mean",
    "first_line",
    "hookimpl",
    "load_state_dict_strict",
    "merge_keys",
    "offered_scores",
    "positions_of",
    "preprocess",
    "read_tensors",
    "renamed_keys",
    "saved_config",
    "square_grid",
    "take_tokens",
    "token_scores",
]
