"""User-facing errors.

Every error a user can cause by bad input derives from `AblateError`. The CLI prints its message as one
paragraph, without a traceback, and exits non-zero; library callers can catch it by type. Messages name the
problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AblateError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in ablate."""


class ConfigError(AblateError):
    """A config value or key is wrong."""


class UnknownComponentError(ConfigError):
    """A component name is not registered."""


class ImageSizeError(ConfigError):
    """An encoder cannot take the requested input size."""


class IncompatibleComponentsError(ConfigError):
    """Two components cannot work together (e.g. a reducer needs what the encoder cannot give)."""


class PluginError(AblateError):
    """A plugin failed to load or register (raised only in strict mode or for direct use)."""


class CheckpointError(AblateError):
    """A checkpoint cannot be read or does not match the architecture."""


class ResourceError(AblateError):
    """The run would not fit the machine (memory)."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The option most similar to `name`, if any is reasonably close."""
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' or ''."""
    match = closest(name, options)
    return f" Did you mean '{match}'?" if match else ""
