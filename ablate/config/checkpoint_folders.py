"""Whole-VLM checkpoint directories as configs, generically: read config.json, ask each registered format whether it
knows the directory, and turn it into an ablate config whose `weights` point at it. (`ablate.model.loading` loads
the tensors after `build`.)

The layouts themselves (transformers' FastVLM, ml-fastvlm's LLaVA, ...) are `CheckpointFormat` plugins registered
through the `register_checkpoint_formats` hook; this module knows none of them by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ablate.api.components import CheckpointFormat
from ablate.api.errors import CheckpointError
from ablate.api.registry import Registry, get_registry


def read_hf_config(directory: Path) -> dict[str, Any]:
    """A checkpoint directory's config.json, as a dict."""
    path = directory / "config.json"
    if not directory.is_dir() or not path.is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint directory (no config.json). Whole-VLM weights load from a directory in "
            f"one of the formats `ablate plugins` lists; for one component's weights use encoder.weights=PATH (or "
            f"connector.weights, decoder.weights) instead."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}). Restore the checkpoint's config.json.") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object of config keys. Restore the checkpoint's "
            f"config.json."
        )
    return config


def detect_format(directory: Path, registry: Registry | None = None) -> CheckpointFormat:
    """The registered format that recognises `directory`."""
    registry = registry or get_registry()
    hf_config = read_hf_config(directory)
    for name in registry.names("checkpoint_format"):
        fmt = registry.get("checkpoint_format", name)()
        with registry.blame("checkpoint_format", name, f"inspecting {directory}"):
            if fmt.detect(directory, hf_config):
                return fmt
    formats = ", ".join(registry.names("checkpoint_format")) or "none registered"
    timm_hint = ""
    if "architecture" in hf_config:  # a timm model directory: one component's weights, not a whole VLM
        timm_hint = (
            f" It looks like a timm '{hf_config['architecture']}' model: load it as encoder weights, e.g. "
            f"encoder.weights={directory / 'model.safetensors'}."
        )
    raise CheckpointError(
        f"Unknown checkpoint format in {directory} (config.json has model_type '{hf_config.get('model_type')}'). "
        f"Registered formats: {formats}. A plugin can add one (CONTRIBUTING.md, 'Add a checkpoint format'); for one "
        f"component's weights use encoder.weights=PATH instead.{timm_hint}{registry.broken_note()}"
    )


def checkpoint_config(directory: Path, registry: Registry | None = None) -> dict[str, Any]:
    """The ablate config (a plain dict) of the model a checkpoint directory holds, `weights` pointing at it."""
    registry = registry or get_registry()
    fmt = detect_format(directory, registry)
    with registry.blame("checkpoint_format", fmt.name, f"reading {directory}"):
        config = fmt.config(directory, read_hf_config(directory))
    return {"name": directory.name, **config, "weights": os.path.abspath(directory)}
