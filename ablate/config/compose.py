"""Config composition: defaults < preset file < user file < command-line `key=value` overrides.

A config names four components, each a node with a `name` and that component's options, plus settings, the
`run:` section (how it is run; `ablate.config.run_options`) and the `train:` section (`ablate.config.train_options`):

    name: fastvlm-0.5b
    encoder: {name: fastvithd, image_size: 1024}
    reducer: {name: none}
    connector: {name: mlp2x_gelu}
    decoder: {name: hf-causal-lm, arch: qwen2-0.5b}
    prompt_tokens: 64
    run: {repeats: 5}

A file may start from another with `base: PRESET_OR_PATH`. `encoder=timm` (on the command line, or a different
`name` in a later file) swaps the component and resets its options to that component's defaults. A checkpoint
directory is a config too: its registered checkpoint format describes the model (and sets `weights`). Keys are
strict: an unknown key fails with its full key path and the closest valid key.

Resolving a config checks its values only, never the machine it is resolved on (devices, CPU count, files named
by it): a grid of `cuda` cells expands on a login node without a GPU. The run checks the machine, where it runs
(`ablate.measurement.machine`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablate.api.config_typing import typed
from ablate.api.errors import AblateError, ConfigError, did_you_mean, first_line
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry, resolving_with
from ablate.config.presets import named_files, preset_files
from ablate.config.run_options import RunOptions
from ablate.config.train_options import StageConfig, TrainOptions, check_stage, check_train

RUN = "run"
TRAIN = "train"  # how the config is trained (ablate.config.train_options); ignored by `ablate run`
SECTIONS = KINDS + (RUN, TRAIN)  # top-level keys whose values are nodes of sub-keys
NOT_HASHED = ("wandb",)  # config keys that change how a run is reported, not what it measures


@dataclass
class Settings:
    """Top-level options that belong to no single component."""

    name: str = "unnamed"
    prompt_tokens: int = 64  # text tokens in the synthetic prompt, besides the image placeholder
    batch_size: int = 1
    image_token_id: int | None = None  # default: the decoder's last vocabulary id
    weights: str | None = None  # a whole-VLM checkpoint directory (see ablate.from_checkpoint)
    wandb: bool = False  # log the run to W&B (`--wandb`); not part of a grid cell's key
    # The raw image's [width, height] (`--image` sets it from the file); None: a square of the encoder's image_size.
    # Only encoders whose tokens depend on the raw size and aspect (AnyRes tiling) count differently for it.
    input_size: list[int] | None = None


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(Settings))
TOP_LEVEL_KEYS = ("base",) + SETTING_KEYS + SECTIONS


@dataclass
class VLMConfig(Settings):
    """A resolved config: settings, one typed config dataclass per component, and the run options."""

    encoder: Any = None
    reducer: Any = None
    connector: Any = None
    decoder: Any = None
    run: RunOptions = field(default_factory=RunOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    sources: list[str] = field(default_factory=list)  # files it was composed from, for the record

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in SETTING_KEYS}
        for kind in KINDS:
            out[kind] = dataclasses.asdict(getattr(self, kind))
        out[RUN] = dataclasses.asdict(self.run)
        out[TRAIN] = dataclasses.asdict(self.train)
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ------------------------------------------------------------------------------------------- sources


def _is_plain_name(source: str) -> bool:
    """A bare word (no folder part, no .yaml): it may name a preset."""
    return os.sep not in source and "/" not in source and not source.endswith((".yaml", ".yml"))


def _is_local_path(source: str) -> bool:
    """Whether `source` means a local file or folder: anything but a bare preset name that also exists locally,
    which is refused as ambiguous (so a folder named like a preset never hides it silently)."""
    if _is_plain_name(source) and source in preset_files() and Path(source).exists():
        raise ConfigError(
            f"'{source}' is both a preset and a local path ({Path(source).resolve()}). Write ./{source} for the local "
            f"path, or run from another folder (or rename it) for the preset {preset_files()[source]}."
        )
    return not (_is_plain_name(source) and source in preset_files())


def find_config_file(source: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path, or a preset name looked up in the preset folders."""
    name = str(source)
    presets = preset_files()
    local = (relative_to / name) if relative_to is not None else Path(name)
    if relative_to is None and not _is_local_path(name):
        return presets[name]
    if relative_to is not None and _is_plain_name(name) and name in presets and not local.exists():
        return presets[name]  # `base: NAME` in a file: a sibling file of that name first, then the preset
    for path in (local, Path(name)):
        if path.is_file():
            return path
    raise ConfigError(
        f"Config '{name}' is neither a file nor a preset.{did_you_mean(name, presets)} "
        f"Presets: {', '.join(sorted(presets)) or 'none found'} (`ablate list presets`). Give a YAML path, a checkpoint "
        f"directory or a preset name.{get_registry().broken_note()}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(raw).__name__}.")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"Cannot read config file {path}: {first_line(exc)}. Fix the YAML syntax.") from None
    return data


def load_layers(source: str | os.PathLike, relative_to: Path | None = None, _seen=()) -> list[tuple[str, dict]]:
    """The file and, first, the chain of `base:` files it builds on, as (path, data) pairs."""
    path = find_config_file(source, relative_to).resolve()
    if path in _seen:
        raise ConfigError(f"Config file {path} includes itself through `base:`; remove the cycle.")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"`base:` in {path} must be a preset name or a file path, not {base!r}.")
    layers = load_layers(base, path.parent, _seen + (path,)) if base else []
    return layers + [(str(path), data)]


# ------------------------------------------------------------------------------------------- merging


def _node(key: str, value: Any, where: str) -> dict[str, Any]:
    if key in KINDS and isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    example = f"{key}=NAME or {key}={{name: NAME, ...}}" if key in KINDS else f"{key}.KEY=VALUE"
    raise ConfigError(f"Config key '{key}' ({where}) must be a mapping of options, not {value!r}. Example: {example}.")


def merge_layer(base: dict[str, Any], layer: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`layer` on top of `base`. A component whose name changes starts again from its own defaults."""
    merged = dict(base)
    for key, value in layer.items():
        if key in SECTIONS:
            node = _node(key, value, where)
            old = merged.get(key) or {}
            if key in KINDS and "name" in node and node["name"] != old.get("name"):
                merged[key] = node  # swap: drop the old component's options
            else:
                merged[key] = _deep_merge(old, node)
        else:
            merged[key] = value
    return merged


def _deep_merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=1' -> (['a', 'b'], 1), values parsed as YAML like OmegaConf's dotlist."""
    if "=" not in text:
        raise ConfigError(
            f"Override '{text}' is not of the form key=value. Example: encoder.image_size=512 or encoder=timm."
        )
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"Override '{text}' has an empty key part. Example: encoder.image_size=512.")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(
            f"Cannot parse the value of override '{text}' as YAML: {first_line(exc)}. Quote text with commas or "
            f"braces, e.g. key='\"a,b\"'."
        ) from None
    return [part.strip() for part in parts], value


def _set_path(node: Any, path: list[str], value: Any, text: str, defaults: Any) -> Any:
    """A copy of `node` with the value at `path` replaced; list items are addressed by index (layers.0=3)."""
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        try:
            index = int(head)
        except ValueError:
            raise ConfigError(f"Override '{text}': '{head}' indexes a list; use a number, e.g. 0.") from None
        if not -len(node) <= index < len(node):
            raise ConfigError(f"Override '{text}': index {index} is out of range for a list of {len(node)} items.")
        node = list(node)
        node[index] = _set_path(node[index], rest, value, text, None) if rest else value
        return node
    if node is not None and not isinstance(node, Mapping):
        raise ConfigError(
            f"Override '{text}': '{head}' goes into {node!r}, a single value, not a mapping of keys. Set the whole "
            f"value instead (e.g. a stage preset name becomes {{base: NAME, ...}} to change its keys)."
        )
    node = dict(node) if isinstance(node, Mapping) else {}
    if not rest:
        node[head] = value
        return node
    child = node.get(head)
    if child is None and isinstance(defaults, Mapping):  # going into a default the config does not spell out
        child = copy.deepcopy(defaults.get(head))
    node[head] = _set_path(child, rest, value, text, defaults.get(head) if isinstance(defaults, Mapping) else None)
    return node


def apply_override(config: dict[str, Any], text: str, registry: Registry | None = None) -> dict[str, Any]:
    parts, value = parse_override(text)
    key = ".".join(parts)
    if key == "base":
        raise ConfigError(
            f"'base' cannot be overridden (override '{text}'): it only chains files. Give that preset or file as the "
            f"config instead, e.g. `ablate run {value} ...`."
        )
    if len(parts) == 1:
        return merge_layer(config, {key: value}, f"override '{text}'")
    head, rest = parts[0], parts[1:]
    if head not in SECTIONS:
        _check_top_level_key(head, f"override '{text}'")
        raise ConfigError(f"Config key '{head}' has no sub-keys; use {head}=VALUE (override '{text}').")
    node = config.get(head) or {}
    if rest == ["name"] and head in KINDS:  # encoder.name=X is a swap too
        return merge_layer(config, {head: {"name": value}}, f"override '{text}'")
    config = dict(config)
    config[head] = _set_path(node, rest, value, text, _defaults(head, node, registry))
    return config


def _defaults(section: str, node: Mapping[str, Any], registry: Registry | None) -> dict[str, Any] | None:
    """The section's default options as plain data (so `encoder.layers.0=3` can edit a default list)."""
    if section == RUN:
        return dataclasses.asdict(RunOptions())
    if section == TRAIN:
        return dataclasses.asdict(TrainOptions())
    try:
        cls = (registry or get_registry()).get(section, node.get("name"))
    except AblateError:
        return None  # an unknown name fails at resolve time, with its own message
    return OmegaConf.to_container(OmegaConf.structured(cls.Config))


def _check_top_level_key(key: Any, where: str) -> None:
    if key not in TOP_LEVEL_KEYS:
        key = str(key)
        raise ConfigError(
            f"Unknown config key '{key}' ({where}).{did_you_mean(key, TOP_LEVEL_KEYS)} "
            f"Top-level keys: {', '.join(TOP_LEVEL_KEYS)}."
        )


# -------------------------------------------------------------------------------------------- typing


def resolve(data: Mapping[str, Any], registry: Registry | None = None, sources: Iterable[str] = ()) -> VLMConfig:
    """Type-check a merged plain-dict config against the registered components."""
    registry = registry or get_registry()
    with resolving_with(registry):  # components that name components look them up here too
        return _resolve(data, registry, sources)


def _resolve(data: Mapping[str, Any], registry: Registry, sources: Iterable[str]) -> VLMConfig:
    for key in data:
        _check_top_level_key(key, "top level of the config")
    settings = {key: data[key] for key in SETTING_KEYS if key in data}
    typed_settings = typed(Settings, settings, "config", "the config", "See `ablate show tiny` for an example.")
    components = {kind: registry.component_config(kind, data.get(kind), kind)[1] for kind in KINDS}
    run = typed(
        RunOptions,
        _node(RUN, data.get(RUN) or {}, "top level"),
        RUN,
        "the run options",
        "See `ablate run --help` for what each option means.",
    )
    train = _resolve_train(_node(TRAIN, data.get(TRAIN) or {}, "top level"))
    config = VLMConfig(**dataclasses.asdict(typed_settings), **components, run=run, train=train, sources=list(sources))
    if config.prompt_tokens < 0:
        raise ConfigError(f"prompt_tokens must be 0 or more, not {config.prompt_tokens}.")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {config.batch_size}.")
    if config.input_size is not None and (len(config.input_size) != 2 or min(config.input_size) < 1):
        raise ConfigError(
            f"input_size must be two positive pixel counts, width then height, not {config.input_size}. Example: "
            f"input_size=[1920,1080], or leave it unset for a square image of the encoder's size."
        )
    config.run.validate()
    registry.runtime(config.run.runtime)  # an unknown runtime fails here, where a grid expands
    return config


def stage_file(name: str, key: str) -> Path:
    """A stage preset: NAME.yaml in the `stages/` folder of a preset folder."""
    names = named_files("stage")
    if name not in names:
        raise ConfigError(
            f"Unknown stage preset '{name}' ({key}).{did_you_mean(name, names)} Stage presets: "
            f"{', '.join(sorted(names)) or 'none found'}; or give the stage as a mapping of its keys."
        )
    return names[name]


def _resolve_train(node: Mapping[str, Any]) -> TrainOptions:
    """The typed `train:` section, each stage a StageConfig: a preset name, or a mapping (on top of `base:` if given)."""
    hint = "See ablate/config/train_options.py (or `ablate show synth-tiny`) for the training keys."
    options = typed(TrainOptions, node, TRAIN, "the training options", hint)
    if not isinstance(options.stages, list):
        raise ConfigError(f"train.stages must be a list of stage presets or stage mappings, not {options.stages!r}.")
    stages = []
    for index, entry in enumerate(options.stages):
        key = f"train.stages.{index}"
        entry = {"base": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key} must be a stage preset name or a mapping of stage keys, not {entry!r}.")
        entry = dict(entry)
        base = entry.pop("base", None)
        layer = {"name": str(base), **read_yaml(stage_file(str(base), f"{key}.base"))} if base is not None else {}
        stage = typed(StageConfig, _deep_merge(layer, entry), key, f"stage {key}", hint)
        check_stage(stage, key)
        stages.append(stage)
    options.stages = stages
    check_train(options)
    return options


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | VLMConfig,
    overrides: Iterable[str] = (),
    registry: Registry | None = None,
    run: Mapping[str, Any] | None = None,
) -> VLMConfig:
    """Compose a config from a preset name, a YAML path, a checkpoint directory or a dict, then overrides.

    `run` (the `ablate run` flags, or `measure`'s keyword arguments) goes on top of everything into `run:`.
    """
    if isinstance(overrides, str):
        raise ConfigError("Overrides must be a list of 'key=value' strings, e.g. ['encoder.image_size=512'].")
    overrides = list(overrides)
    if isinstance(source, VLMConfig):
        if not overrides and not run:
            return source
        source = source.to_dict()
    if not isinstance(source, (Mapping, str, os.PathLike)) or not str(source).strip():
        raise ConfigError(f"A config is a preset name, a YAML path, a checkpoint directory or a dict, not {source!r}.")
    if not isinstance(source, Mapping) and _is_local_path(str(source)) and Path(source).is_dir():
        # a checkpoint directory describes its model
        from ablate.config.checkpoint_folders import checkpoint_config

        source = checkpoint_config(Path(source), registry)
    if isinstance(source, Mapping):
        data = dict(source)
        base = data.pop("base", None)
        layers = load_layers(base) if base else []
        layers.append(("<dict>", data))
    else:
        layers = load_layers(source)
    merged: dict[str, Any] = {}
    sources: list[str] = []
    for where, layer in layers:
        merged = merge_layer(merged, layer, where)
        sources.append(where)
    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError(f"Override {text!r} is not a 'key=value' string.")
        merged = apply_override(merged, text, registry)
    if run:
        merged = merge_layer(merged, {RUN: dict(run)}, "run options")
    return resolve(merged, registry, sources)


def config_hash(config: Mapping[str, Any]) -> str:
    """The key of a resolved config (`VLMConfig.to_dict()`, run section included): the same config, the same key.
    A results store keys its rows by it."""
    kept = {key: value for key, value in config.items() if key not in NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
