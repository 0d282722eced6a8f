"""Plugin isolation, registration checks and lookups, with real pluggy plugin objects."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from ablate.api import hookimpl
from ablate.api.components import Connector, ConnectorConfig
from ablate.api.errors import PluginError, UnknownComponentError
from ablate.api.registry import Registry, get_registry


def connector_class(name: str):
    @dataclass
    class Config(ConnectorConfig):
        scale: float = 1.0

    class Scale(Connector):
        """Multiplies tokens (test connector)."""

        def forward(self, tokens):
            return tokens * self.config.scale

    Scale.name, Scale.Config = name, Config
    return Scale


def plugin(**hooks):
    """A plugin object whose hooks are the given functions, marked as ablate hook implementations."""
    module = types.SimpleNamespace()
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def test_builtins_register_through_entry_points():
    registry = get_registry()
    assert {"timm", "fastvithd", "fastvit-tiny"} <= set(registry.names("encoder"))
    assert {"none", "prumerge"} <= set(registry.names("reducer"))
    assert {"linear", "mlp2x_gelu"} <= set(registry.names("connector"))
    assert "hf-causal-lm" in registry.names("decoder")
    assert all(info.error is None for info in registry.plugins.values()), registry.plugins


def test_plugin_registers_components():
    registry = Registry()
    registry.add_plugin(plugin(register_connectors=lambda register: register(connector_class("scale"))), "mine")
    assert registry.get("connector", "scale").name == "scale"
    assert registry.plugins["mine"].components == [("connector", "scale")]


def test_failing_hook_is_reported_and_its_components_dropped():
    def register(register):
        register(connector_class("half-done"))
        raise RuntimeError("boom")

    registry = Registry()
    registry.add_plugin(plugin(register_connectors=register), "broken")
    registry.add_plugin(plugin(register_connectors=lambda register: register(connector_class("fine"))), "good")
    assert "boom" in registry.plugins["broken"].error
    assert registry.names("connector") == ["fine"]


def _raise_boom(register):
    raise RuntimeError("boom")


def test_strict_mode_raises_naming_the_plugin():
    registry = Registry()
    with pytest.raises(PluginError, match="broken.*boom"):
        registry.add_plugin(plugin(register_connectors=_raise_boom), "broken", strict=True)


def test_misspelled_hook_fails_loudly():
    registry = Registry()
    registry.add_plugin(plugin(register_conectors=lambda register: None), "typo")
    assert "register_conectors" in registry.plugins["typo"].error


def test_duplicate_name_and_bad_class_are_rejected():
    registry = Registry()
    registry.add_plugin(plugin(register_connectors=lambda register: register(connector_class("dup"))), "first")
    registry.add_plugin(plugin(register_connectors=lambda register: register(connector_class("dup"))), "second")
    assert "already registered by plugin 'first'" in registry.plugins["second"].error
    registry.add_plugin(plugin(register_connectors=lambda register: register(torch.nn.Linear)), "wrong")
    assert "not a subclass" in registry.plugins["wrong"].error


def test_unknown_name_suggests_and_lists():
    registry = get_registry()
    with pytest.raises(UnknownComponentError) as info:
        registry.get("encoder", "fastvithdd", key="encoder.name")
    message = str(info.value)
    assert "Did you mean 'fastvithd'" in message and "encoder.name" in message and "timm" in message
