"""Plugin loading and lookup of components, checkpoint formats and preset folders.

Plugins are found through the `ablate` entry-point group, built-ins included; ablate's own entry points load first,
so a third-party plugin can never take a built-in's name (it fails to load instead, and says why). Each plugin is
imported and asked to register on its own, so one broken plugin is reported (see `ablate plugins`) instead of
breaking the tool.

Environment:
  ABLATE_PLUGINS=a,b        load only these entry points (by entry-point name)
  ABLATE_STRICT_PLUGINS=1   a plugin that fails to load or register raises (for plugin authors)
"""

from __future__ import annotations

import dataclasses
import os
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy
from omegaconf import OmegaConf

import ablate.api.hooks as hookspecs
from ablate.api.components import COMPONENT_BASES
from ablate.api.config_typing import typed
from ablate.api.errors import (
    AblateError,
    ConfigError,
    PluginError,
    ResourceError,
    UnknownComponentError,
    did_you_mean,
    out_of_memory,
    unexpected,
)
from ablate.api.hooks import KINDS
from ablate.api.runtimes import TORCH_RUNTIME, Runtime
from ablate.version import DISTRIBUTION

# What each kind of registered class must subclass.
BASES: dict[str, type] = {**COMPONENT_BASES, "runtime": Runtime}


@dataclass
class PluginInfo:
    """What `ablate plugins` shows about one plugin."""

    name: str
    module: str
    version: str | None = None
    builtin: bool = False
    components: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    error: str | None = None  # one-line summary of a load/register failure
    traceback: str | None = None


class Registry:
    """Components by kind and name, checkpoint formats, preset folders, and the plugins that provided them."""

    def __init__(self):
        self.components: dict[str, dict[str, type]] = {kind: {} for kind in BASES}
        self.preset_folders: list[tuple[str, Path]] = []  # (plugin name, folder)
        self.owner: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin name
        self.plugins: dict[str, PluginInfo] = {}
        self.selection: set[str] | None = None  # ABLATE_PLUGINS, when it limits what loads
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # -------------------------------------------------------------------------------------- loading

    def load_entry_points(self, only: set[str] | None = None, strict: bool = False) -> None:
        self.selection = only

        def builtins_first(entry_point):
            return (not _is_builtin(entry_point), entry_point.name)

        for entry_point in sorted(metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=builtins_first):
            if only is not None and entry_point.name not in only:
                continue
            if entry_point.name in self.plugins:  # the same distribution seen twice on sys.path
                continue
            version = entry_point.dist.version if entry_point.dist else None
            info = PluginInfo(entry_point.name, entry_point.value, version, builtin=_is_builtin(entry_point))
            self.plugins[info.name] = info
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a plugin's import may fail in any way; report it, keep going
                self._fail(info, f"import of {entry_point.value} failed: {type(exc).__name__}: {exc}", strict)
                continue
            self.add_plugin(plugin, info, strict=strict)
        for name in sorted((only or set()) - set(self.plugins)):
            self.plugins[name] = PluginInfo(
                name, "-", error="ABLATE_PLUGINS names it, but no installed plugin has that entry-point name"
            )
            if strict:
                self._fail(self.plugins[name], self.plugins[name].error, strict)

    def add_plugin(self, plugin, info: PluginInfo | str, strict: bool = False) -> None:
        """Register one plugin object (module or instance) and collect what it registers."""
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
                    impl.function(register=lambda thing, kind=kind: self._register(kind, thing, info))
                except Exception as exc:
                    self._drop(info)
                    self.pm.unregister(plugin)
                    self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}", strict)
                    return

    def _register(self, kind: str, thing, info: PluginInfo) -> None:
        if kind == "preset_folder":
            folder = Path(thing)
            if not folder.is_dir():
                raise ValueError(f"preset folder {folder} does not exist")
            self.preset_folders.append((info.name, folder))
            info.components.append((kind, str(folder)))
            return
        base = BASES[kind]
        if not (isinstance(thing, type) and issubclass(thing, base)):
            raise TypeError(f"{thing!r} is not a subclass of ablate.api.{base.__name__}")
        name = getattr(thing, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{thing.__name__} has no `name` class attribute")
        if kind == "runtime" and name == TORCH_RUNTIME:
            raise ValueError(f"runtime '{name}' is ablate's own (PyTorch, the reference); pick another name")
        if kind in KINDS:
            if not dataclasses.is_dataclass(thing.Config):
                raise TypeError(f"{thing.__name__}.Config must be a dataclass")
            try:  # a Config that OmegaConf cannot type would otherwise fail much later, at config time
                OmegaConf.structured(thing.Config)
            except Exception as exc:
                raise TypeError(f"{thing.__name__}.Config is not a valid structured config: {exc}") from None
        if name in self.components[kind]:
            owner = self.owner[(kind, name)]
            builtin = " (built into ablate)" if self.plugins[owner].builtin else ""
            raise ValueError(f"{kind} '{name}' is already registered by plugin '{owner}'{builtin}; pick another name")
        self.components[kind][name] = thing
        self.owner[(kind, name)] = info.name
        info.components.append((kind, name))

    def _drop(self, info: PluginInfo) -> None:
        for kind, name in info.components:
            if kind == "preset_folder":
                self.preset_folders = [(p, f) for p, f in self.preset_folders if p != info.name]
                continue
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
        """The class registered under `name`; a helpful error if there is none."""
        if kind not in self.components:
            raise UnknownComponentError(f"Unknown component kind '{kind}'. Kinds: {', '.join(KINDS)}.")
        try:
            return self.components[kind][name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list or mapping given as the name)
            pass
        where = f" (config key '{key}')" if key else ""
        available = ", ".join(self.names(kind)) or "none registered"
        hint = did_you_mean(str(name), self.names(kind))
        listing = "list" if kind in KINDS else "plugins"
        raise UnknownComponentError(
            f"Unknown {kind} '{name}'{where}.{hint} Available {kind}s: {available}. "
            f"Run `ablate {listing}` for descriptions and options.{self.broken_note()}"
        )

    def runtime(self, name: str) -> type[Runtime] | None:
        """The runtime class registered as `name` (run.runtime); None for ablate's own, torch."""
        if name == TORCH_RUNTIME:
            return None
        names = [TORCH_RUNTIME, *self.names("runtime")]
        if name not in self.components["runtime"]:
            raise UnknownComponentError(
                f"Unknown runtime '{name}' (config key 'run.runtime').{did_you_mean(str(name), names)} Available "
                f"runtimes: {', '.join(names)}. Run `ablate plugins` to see which plugin adds each.{self.broken_note()}"
            )
        return self.components["runtime"][name]

    def component_config(self, kind: str, node: Any, key: str) -> tuple[type, Any]:
        """The class and the typed, resolved Config of a component node ({name: NAME, option: value, ...}) found at
        config key `key`: 'encoder' for a config's own, or e.g. 'encoder.tile' for one a composite component names.
        Unknown names, unknown keys and bad values fail as ConfigErrors naming the key."""
        if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
            raise ConfigError(
                f"The config names no {kind} at '{key}': give it a component, e.g. {key}=NAME on the command line or "
                f"{key}: {{name: NAME, ...}} in a file. Available {kind}s: {', '.join(self.names(kind)) or 'none registered'}."
            )
        cls = self.get(kind, node["name"], key=f"{key}.name")
        hint = f"Run `ablate list {kind}` to see the options of {kind} '{node['name']}' and their types."
        config = typed(cls.Config, node, key, f"{kind} '{node['name']}'", hint)
        with self.blame(kind, config.name, "resolving its config"):
            config = cls.resolve_config(config)
        return cls, config

    def plugin_of(self, kind: str, name: str) -> str | None:
        return self.owner.get((kind, name))

    @contextmanager
    def blame(self, kind: str, name: str, what: str) -> Iterator[None]:
        """Turn an unexpected exception inside component `name` into a PluginFailure naming its plugin."""
        try:
            yield
        except AblateError:
            raise  # a plugin's own clear message about bad input
        except Exception as exc:
            if out_of_memory(exc):
                raise ResourceError(
                    f"Out of memory while {what} ({kind} '{name}'): {exc}. Use a smaller model, batch or image size, "
                    f"--dtype bfloat16, or --count-only (no weights allocated)."
                ) from exc
            raise unexpected(
                exc, f"{what} ({kind} '{name}')", self.plugin_of(kind, name) or f"unknown ({kind} '{name}')"
            ) from exc

    def plugin_in_traceback(self, exc: BaseException) -> str | None:
        """The plugin whose module raised `exc` (the innermost plugin frame of its traceback); None: none did."""
        modules = {info.module.partition(":")[0]: name for name, info in self.plugins.items()}
        for (kind, component), owner in self.owner.items():  # components may live outside their plugin's module
            modules.setdefault(self.components[kind][component].__module__, owner)
        blamed = None
        tb = exc.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_globals.get("__name__", "")
            for prefix, name in modules.items():
                if module == prefix or module.startswith(prefix + "."):
                    blamed = name
            tb = tb.tb_next
        return blamed

    def broken_note(self) -> str:
        broken = [p.name for p in self.plugins.values() if p.error]
        note = f" Plugins that failed to load: {', '.join(broken)} (see `ablate plugins`)." if broken else ""
        if self.selection is not None:
            note += f" Only the plugins in ABLATE_PLUGINS={','.join(sorted(self.selection))} were loaded."
        return note

    def versions(self) -> dict[str, str | None]:
        """Every loaded plugin's version (None for plugins that are not installed distributions)."""
        return {name: info.version for name, info in sorted(self.plugins.items()) if not info.error}


def component_class(kind: str, name: str, key: str | None = None) -> type:
    """The class registered as `kind` (encoder, reducer, connector, decoder, checkpoint_format) under `name`; an
    UnknownComponentError naming the options (and the config `key`, when given) if there is none."""
    return get_registry().get(kind, name, key)


def component_config(kind: str, node: Any, key: str) -> tuple[type, Any]:
    """The class and typed, resolved Config of a component node ({name: NAME, ...}) that a composite component's
    own options hold at config key `key` (e.g. 'encoder.tile'), checked as strictly as a top-level component."""
    return get_registry().component_config(kind, node, key)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: ablate-vlm, ablate_vlm and Ablate.VLM are one name


def _is_builtin(entry_point) -> bool:
    """Entry points of ablate's own distribution are the built-ins."""
    return entry_point.dist is not None and _normalized(entry_point.dist.name) == _normalized(DISTRIBUTION)


_registry: Registry | None = None
# The registry a config is being resolved against, when it is not the process-wide one: a composite component
# (AnyRes) looks its nested component up in the same registry as the config that names it.
_resolving: ContextVar[Registry | None] = ContextVar("ablate_resolving_registry", default=None)


@contextmanager
def resolving_with(registry: Registry) -> Iterator[None]:
    """Within the block, `get_registry()` is `registry`."""
    token = _resolving.set(registry)
    try:
        yield
    finally:
        _resolving.reset(token)


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use (respects ABLATE_PLUGINS/STRICT); inside
    `resolving_with(registry)`, that registry."""
    global _registry
    if not reload and _resolving.get() is not None:
        return _resolving.get()
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
