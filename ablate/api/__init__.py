"""ablate's public plugin API: everything a plugin may import, built-in or third-party alike.

    from ablate.api import EncoderConfig, StageContext, TokenLayout, VisionEncoder, hookimpl

A plugin implements a hook (`hookimpl`) that registers component classes (encoders, reducers, connectors,
decoders), checkpoint formats or runtimes (where the timed stages run), built on the base classes here. The shared
machinery it may use: errors that the CLI turns into one-paragraph messages, strict weight loading from local
files, image preprocessing, the token scores and index helpers of reducers, and lookups of other registered
components (for composite ones, like AnyRes around a tile encoder). Conformance suites for a plugin's own tests
are in `ablate.api.testing` (needs pytest).

The names exported here (`__all__`) and the behaviour their docstrings describe are what stays stable between
minor versions; CONTRIBUTING.md ("The public plugin API and its stability") states the promise. Anything not
exported here (ablate's other modules, names starting with `_`) may change in any release.

Each name is imported from its module on first use, so that `import ablate.api.errors` (the CLI's start-up, a
`--help`) does not import torch.
"""

from __future__ import annotations

import importlib

# exported name -> (module under ablate.api, its name there)
_EXPORTS: dict[str, tuple[str, str]] = {
    **{
        name: ("components", name)
        for name in (
            "ATTENTION",
            "CLS",
            "DECODER_PRUNING",
            "IGNORE_INDEX",
            "TEXT",
            "WELL_KNOWN_EXTRAS",
            "Attention",
            "CheckpointFormat",
            "Component",
            "ComponentConfig",
            "Connector",
            "ConnectorConfig",
            "Crop",
            "Decoder",
            "DecoderConfig",
            "DecoderOutput",
            "DecoderPruning",
            "EncoderConfig",
            "LayerStates",
            "ReducerConfig",
            "StageContext",
            "TokenLayout",
            "TokenReducer",
            "VisionEncoder",
            "check_multiple",
            "square_grid",
        )
    },
    **{
        name: ("errors", name)
        for name in (
            "AblateError",
            "CheckpointError",
            "ConfigError",
            "DataError",
            "ImageSizeError",
            "IncompatibleComponentsError",
            "ResourceError",
            "did_you_mean",
            "first_line",
        )
    },
    "hookimpl": ("hooks", "hookimpl"),
    "KINDS": ("hooks", "KINDS"),
    "Preprocessing": ("preprocessing", "Preprocessing"),
    "preprocess": ("preprocessing", "preprocess"),
    **{
        name: ("reducers", name)
        for name in (
            "SCORES",
            "Score",
            "check_prune_layer",
            "context_score",
            "merge_keys",
            "offered_scores",
            "pick_score",
            "positions_of",
            "take_tokens",
            "token_scores",
        )
    },
    **{
        name: ("runtimes", name)
        for name in (
            "TORCH_RUNTIME",
            "FlatStage",
            "Runtime",
            "RuntimeStage",
            "StageFallback",
            "tensor_names",
            "tensors_of",
            "with_tensors",
        )
    },
    "component_class": ("registry", "component_class"),
    "component_config": ("registry", "component_config"),
    "SAVED_MODEL_TYPE": ("saved_models", "MODEL_TYPE"),
    "saved_config": ("saved_models", "saved_config"),
    **{name: ("weights", name) for name in ("load_state_dict_strict", "meta_device", "read_tensors", "renamed_keys")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(f"ablate.api.{module}"), attribute)
    raise AttributeError(f"module 'ablate.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
