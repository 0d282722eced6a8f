"""ablate: swap, time and count the parts of a vision-language model from one config."""

from __future__ import annotations

from ablate.hookspecs import hookimpl
from ablate.version import __version__

__all__ = ["VLM", "__version__", "build", "from_checkpoint", "hookimpl", "load_config", "measure"]

# The public API, imported on first use: `import ablate` (which every plugin does) and the CLI's startup stay light,
# and torch loads only when a model is needed. Module names differ from these names, so nothing shadows them.
_LAZY = {
    "VLM": "ablate.model",
    "build": "ablate.model",
    "from_checkpoint": "ablate.model",
    "load_config": "ablate.config",
    "measure": "ablate.measurement",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")
