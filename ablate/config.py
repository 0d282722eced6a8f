"""Config composition: defaults < preset file < user file < command-line `key=value` overrides.

A config names four components, each a node with a `name` and that component's options:

    name: fastvlm-0.5b
    encoder: {name: fastvithd, image_size: 1024}
    reducer: {name: none}
    connector: {name: mlp2x_gelu}
    decoder: {name: hf-causal-lm, arch: qwen2-0.5b}
    prompt_tokens: 64

A file may start from another with `base: PRESET_OR_PATH`. `encoder=timm` (on the command line, or a
different `name` in a later file) swaps the component and resets its options to that component's defaults.
Keys are strict: an unknown key fails with its full key path and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablate.errors import ConfigError, did_you_mean
from ablate.registry import KINDS, Registry, get_registry

PRESET_DIRS_ENV = "ABLATE_PRESETS"  # extra preset folders, os.pathsep-separated, searched first


@dataclass
class Settings:
    """Top-level options that belong to no single component."""

    name: str = "unnamed"
    prompt_tokens: int = 64  # text tokens in the synthetic prompt, besides the image placeholder
    batch_size: int = 1
    image_token_id: int | None = None  # default: the decoder's last vocabulary id
    weights: str | None = None  # a whole-VLM checkpoint directory (see ablate.from_checkpoint)


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(Settings))
TOP_LEVEL_KEYS = ("base",) + SETTING_KEYS + KINDS


@dataclass
class VLMConfig(Settings):
    """A resolved config: settings plus one typed config dataclass per component."""

    encoder: Any = None
    reducer: Any = None
    connector: Any = None
    decoder: Any = None
    sources: list[str] = field(default_factory=list)  # files it was composed from, for the record

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in SETTING_KEYS}
        for kind in KINDS:
            out[kind] = dataclasses.asdict(getattr(self, kind))
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ------------------------------------------------------------------------------------------- sources


def preset_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(PRESET_DIRS_ENV, "").split(os.pathsep) if p]
    # The repo's experiments/ folder (an editable or source checkout keeps it beside the package).
    dirs.append(Path(__file__).resolve().parent.parent / "experiments")
    return dirs


def preset_names() -> list[str]:
    names = set()
    for folder in preset_dirs():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def find_config_file(source: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path, or a preset name looked up in the preset folders."""
    candidates = [Path(source)]
    if relative_to is not None:
        candidates.insert(0, relative_to / source)
    name = str(source)
    for folder in preset_dirs():
        candidates.append(folder / name)
        candidates.append(folder / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    presets = preset_names()
    raise ConfigError(
        f"Config '{source}' is neither a file nor a preset.{did_you_mean(name, presets)} "
        f"Presets: {', '.join(presets) or 'none found'}. Give a YAML path or a preset name "
        f"(preset folders: {', '.join(str(d) for d in preset_dirs())})."
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}. Fix the YAML syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def load_layers(source: str | os.PathLike, relative_to: Path | None = None, _seen=()) -> list[tuple[str, dict]]:
    """The file and, first, the chain of `base:` files it builds on, as (path, data) pairs."""
    path = find_config_file(source, relative_to).resolve()
    if path in _seen:
        raise ConfigError(f"Config file {path} includes itself through `base:`; remove the cycle.")
    data = read_yaml(path)
    base = data.pop("base", None)
    layers = load_layers(base, path.parent, _seen + (path,)) if base else []
    return layers + [(str(path), data)]


# ------------------------------------------------------------------------------------------- merging


def _component_node(kind: str, value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(
        f"Config key '{kind}' ({where}) must be a component name or a mapping with a 'name', "
        f"not {value!r}. Example: {kind}={{name: ...}} or {kind}=NAME."
    )


def merge_layer(base: dict[str, Any], layer: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`layer` on top of `base`. A component whose name changes starts again from its own defaults."""
    merged = dict(base)
    for key, value in layer.items():
        if key in KINDS:
            node = _component_node(key, value, where)
            old = merged.get(key) or {}
            if "name" in node and node["name"] != old.get("name"):
                merged[key] = node  # swap: drop the old component's options
            else:
                merged[key] = OmegaConf.to_container(OmegaConf.merge(old, node))
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=1' -> ('a.b', 1), values parsed as YAML like OmegaConf's dotlist."""
    if "=" not in text:
        raise ConfigError(
            f"Override '{text}' is not of the form key=value. Example: encoder.image_size=512 or encoder=timm."
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"Cannot parse the value of override '{text}': {exc}") from None
    return key, value


def apply_override(config: dict[str, Any], text: str) -> dict[str, Any]:
    key, value = parse_override(text)
    parts = key.split(".")
    if len(parts) == 1:
        return merge_layer(config, {key: value}, f"override '{text}'")
    head, rest = parts[0], parts[1:]
    if head not in KINDS:
        _check_top_level_key(head, f"override '{text}'")
        raise ConfigError(f"Config key '{head}' has no sub-keys; use {head}=VALUE (override '{text}').")
    node = dict(config.get(head) or {})
    target = node
    for part in rest[:-1]:
        child = target.get(part)
        target[part] = dict(child) if isinstance(child, Mapping) else {}
        target = target[part]
    target[rest[-1]] = value
    config = dict(config)
    config[head] = node
    if rest == ["name"]:  # encoder.name=X is a swap too
        config = merge_layer({k: v for k, v in config.items() if k != head}, {head: {"name": value}}, text)
    return config


def _check_top_level_key(key: str, where: str) -> None:
    if key not in TOP_LEVEL_KEYS:
        raise ConfigError(
            f"Unknown config key '{key}' ({where}).{did_you_mean(key, TOP_LEVEL_KEYS)} "
            f"Top-level keys: {', '.join(TOP_LEVEL_KEYS)}."
        )


# -------------------------------------------------------------------------------------------- typing


def _typed_component(kind: str, node: Mapping[str, Any] | None, registry: Registry) -> Any:
    if not node or "name" not in node:
        raise ConfigError(
            f"The config names no {kind}: set '{kind}' to a component, e.g. {kind}=NAME on the command line. "
            f"Available {kind}s: {', '.join(registry.names(kind)) or 'none'}."
        )
    cls = registry.get(kind, node["name"], key=f"{kind}.name")
    schema = OmegaConf.structured(cls.Config)
    _check_keys(schema, node, kind, f"{kind} '{node['name']}'")
    try:
        merged = OmegaConf.merge(schema, node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"Bad value for config key '{kind}.{key}': {exc.msg if hasattr(exc, 'msg') else exc}. "
            f"Run `ablate list {kind}` to see the options of {kind} '{node['name']}' and their types."
        ) from None


def _check_keys(schema: DictConfig, node: Mapping[str, Any], path: str, owner: str) -> None:
    for key, value in node.items():
        if key not in schema:
            options = [k for k in schema.keys() if k != "name"]
            raise ConfigError(
                f"Unknown config key '{path}.{key}' for {owner}.{did_you_mean(str(key), options)} "
                f"Its options: {', '.join(options) or 'none'}. Run `ablate list` to see every component's options."
            )
        child = schema._get_node(key)
        if isinstance(child, DictConfig) and isinstance(value, Mapping) and not child._is_none():
            if OmegaConf.get_type(child) not in (dict, None):  # nested structured config: strict too
                _check_keys(child, value, f"{path}.{key}", owner)


def resolve(data: Mapping[str, Any], registry: Registry | None = None, sources: Iterable[str] = ()) -> VLMConfig:
    """Type-check a merged plain-dict config against the registered components."""
    registry = registry or get_registry()
    for key in data:
        _check_top_level_key(key, "top level of the config")
    settings = {key: data[key] for key in SETTING_KEYS if key in data}
    try:
        typed_settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Settings), settings))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"Bad value for config key '{getattr(exc, 'full_key', '?')}': {exc.msg}") from None
    components = {kind: _typed_component(kind, data.get(kind), registry) for kind in KINDS}
    config = VLMConfig(**dataclasses.asdict(typed_settings), **components, sources=list(sources))
    if config.prompt_tokens < 0 or config.batch_size < 1:
        raise ConfigError("prompt_tokens must be >= 0 and batch_size >= 1.")
    return config


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | VLMConfig,
    overrides: Iterable[str] = (),
    registry: Registry | None = None,
) -> VLMConfig:
    """Compose a config from a preset name, a YAML path, a checkpoint directory or a dict, then overrides."""
    overrides = list(overrides)
    if isinstance(source, VLMConfig):
        if not overrides:
            return source
        source = source.to_dict()
    sources: list[str] = []
    if not isinstance(source, Mapping) and Path(source).is_dir():  # a checkpoint directory describes its model
        from ablate.checkpoints import ablate_config

        source = ablate_config(Path(source))
    if isinstance(source, Mapping):
        data = dict(source)
        base = data.pop("base", None)
        layers = load_layers(base) if base else []
        layers.append(("<dict>", data))
    else:
        layers = load_layers(source)
    merged: dict[str, Any] = {}
    for where, layer in layers:
        merged = merge_layer(merged, layer, where)
        sources.append(where)
    for text in overrides:
        merged = apply_override(merged, text)
    return resolve(merged, registry, sources)
