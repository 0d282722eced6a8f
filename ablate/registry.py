"""Plugin loading and component lookup.

Plugins are found through the `ablate` entry-point group, built-ins included. Each one is imported and asked
to register on its own, so one broken plugin is reported (see `ablate plugins`) instead of breaking the tool.

Environment:
  ABLATE_PLUGINS=a,b        load only these entry points (by entry-point name)
  ABLATE_STRICT_PLUGINS=1   a plugin that fails to load or register raises (for plugin authors)
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata

import pluggy
from omegaconf import OmegaConf

from ablate import hookspecs
from ablate.components import COMPONENT_BASES
from ablate.errors import PluginError, UnknownComponentError, did_you_mean

KINDS = tuple(hookspecs.HOOKS)


@dataclass
class PluginInfo:
    """What `ablate plugins` shows about one plugin."""

    name: str
    module: str
    version: str | None = None
    components: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    error: str | None = None  # one-line summary of a load/register failure
    traceback: str | None = None


class Registry:
    """Components by kind and name, and the plugins that provided them."""

    def __init__(self):
        self.components: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
        self.owner: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin name
        self.plugins: dict[str, PluginInfo] = {}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # -------------------------------------------------------------------------------------- loading

    def load_entry_points(self, only: set[str] | None = None, strict: bool = False) -> None:
        for entry_point in sorted(metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
            if only is not None and entry_point.name not in only:
                continue
            if entry_point.name in self.plugins:  # the same distribution seen twice on sys.path
                continue
            version = entry_point.dist.version if entry_point.dist else None
            info = PluginInfo(name=entry_point.name, module=entry_point.value, version=version)
            self.plugins[info.name] = info
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a plugin's import may fail in any way; report it, keep going
                self._fail(info, f"import of {entry_point.value} failed: {type(exc).__name__}: {exc}", strict)
                continue
            self.add_plugin(plugin, info, strict=strict)

    def add_plugin(self, plugin, info: PluginInfo | str, strict: bool = False) -> None:
        """Register one plugin object (module or instance) and collect its components."""
        if isinstance(info, str):
            info = PluginInfo(name=info, module=getattr(plugin, "__name__", repr(plugin)))
            self.plugins[info.name] = info
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()  # a misspelled hook name fails here, loudly
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, f"registration failed: {exc}", strict)
            return
        for kind, hook_name in hookspecs.HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(register=lambda cls, kind=kind: self._register(kind, cls, info))
                except Exception as exc:
                    self._drop(info)
                    self.pm.unregister(plugin)
                    self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}", strict)
                    return

    def _register(self, kind: str, cls: type, info: PluginInfo) -> None:
        base = COMPONENT_BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} is not a subclass of ablate.components.{base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} has no `name` class attribute")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        try:  # a Config that OmegaConf cannot type would otherwise fail much later, at config time
            OmegaConf.structured(cls.Config)
        except Exception as exc:
            raise TypeError(f"{cls.__name__}.Config is not a valid structured config: {exc}") from None
        if name in self.components[kind]:
            raise ValueError(
                f"{kind} '{name}' is already registered by plugin '{self.owner[(kind, name)]}'; pick another name"
            )
        self.components[kind][name] = cls
        self.owner[(kind, name)] = info.name
        info.components.append((kind, name))

    def _drop(self, info: PluginInfo) -> None:
        for kind, name in info.components:
            self.components[kind].pop(name, None)
            self.owner.pop((kind, name), None)
        info.components.clear()

    def _fail(self, info: PluginInfo, message: str, strict: bool) -> None:
        info.error = message
        info.traceback = traceback.format_exc()
        if strict:
            raise PluginError(
                f"Plugin '{info.name}' ({info.module}) failed: {message}. Strict plugin loading is on "
                f"(ABLATE_STRICT_PLUGINS=1); fix the plugin, or unset that variable to skip broken plugins."
            )

    # --------------------------------------------------------------------------------------- lookup

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str, key: str | None = None) -> type:
        """The component class registered under `name`; a helpful error if there is none."""
        if kind not in self.components:
            raise UnknownComponentError(f"Unknown component kind '{kind}'. Kinds: {', '.join(KINDS)}.")
        try:
            return self.components[kind][name]
        except KeyError:
            pass
        where = f" (config key '{key}')" if key else ""
        available = ", ".join(self.names(kind)) or "none"
        hint = did_you_mean(str(name), self.names(kind))
        broken = [p.name for p in self.plugins.values() if p.error]
        broken_note = f" Plugins that failed to load: {', '.join(broken)} (see `ablate plugins`)." if broken else ""
        raise UnknownComponentError(
            f"Unknown {kind} '{name}'{where}.{hint} Available {kind}s: {available}. "
            f"Run `ablate list {kind}` for descriptions and options.{broken_note}"
        )


_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use (respects ABLATE_PLUGINS/STRICT)."""
    global _registry
    if _registry is None or reload:
        registry = Registry()
        only = os.environ.get("ABLATE_PLUGINS")
        strict = os.environ.get("ABLATE_STRICT_PLUGINS", "") not in ("", "0", "false", "False")
        registry.load_entry_points(
            only={name.strip() for name in only.split(",") if name.strip()} if only else None,
            strict=strict,
        )
        _registry = registry
    return _registry
