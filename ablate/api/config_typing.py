"""Strict typing of config nodes: one mapping of options checked against a dataclass, as every config key is.

Unknown keys fail with their full key path and the closest valid key; values are typed by OmegaConf; `Literal`
fields (which OmegaConf does not check) must hold one of their values. The config wing types every part of a config
this way; `Registry.component_config` types a component node, for the config wing and for a composite component
(AnyRes names its tile encoder among its options), so a nested component is held to the same rules.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablate.api.errors import ConfigError, did_you_mean, first_line


def literal_fields(config_class: type) -> dict[str, tuple]:
    """Config fields typed as Literal[...] and their allowed values."""
    hints = typing.get_type_hints(config_class)
    out = {}
    for f in dataclasses.fields(config_class):
        hint = hints.get(f.name)
        if typing.get_origin(hint) is Literal:
            out[f.name] = typing.get_args(hint)
    return out


def check_literals(config: Any, path: str) -> None:
    """Every Literal field of a config dataclass holds one of its values; a ConfigError naming `path.field` if not."""
    for name, allowed in literal_fields(type(config)).items():
        if getattr(config, name) not in allowed:
            raise ConfigError(
                f"Bad value for config key '{path}.{name}': {getattr(config, name)!r}. Choose one of: "
                f"{', '.join(map(str, allowed))}."
            )


def check_keys(schema: DictConfig, node: Mapping[str, Any], path: str, owner: str) -> None:
    """Every key of `node` exists in `schema` (nested structured configs too); else the key's path and the closest."""
    for key, value in node.items():
        if key not in schema:
            options = [k for k in schema.keys() if k != "name"]
            raise ConfigError(
                f"Unknown config key '{path}.{key}' for {owner}.{did_you_mean(str(key), options)} "
                f"Its options: {', '.join(options) or 'it has none'}. Run `ablate list` to see every component's options."
            )
        child = schema._get_node(key)
        if isinstance(child, DictConfig) and isinstance(value, Mapping) and not child._is_none():
            if OmegaConf.get_type(child) not in (dict, None):  # nested structured config: strict too
                check_keys(child, value, f"{path}.{key}", owner)


def typed(schema_class: type, node: Mapping[str, Any], path: str, owner: str, hint: str) -> Any:
    """`node` as an instance of the dataclass `schema_class`: strict keys, types, Literal values."""
    schema = OmegaConf.structured(schema_class)
    check_keys(schema, node, path, owner)
    try:
        value = OmegaConf.to_object(OmegaConf.merge(schema, node))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"Bad value for config key '{path}.{key}': {first_line(exc)}. {hint}") from None
    check_literals(value, path)
    return value
