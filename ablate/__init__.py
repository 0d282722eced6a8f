"""ablate: swap, time and count the parts of a vision-language model from one config."""

from __future__ import annotations

from ablate.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["VLM", "__version__", "build", "from_checkpoint", "hookimpl", "load_config", "measure"]


def __getattr__(name: str):
    # Lazy: plugins import `ablate.hookimpl` while the registry loads them, before model code is needed.
    if name in ("build", "VLM"):
        from ablate import model

        return getattr(model, name)
    if name == "load_config":
        from ablate.config import load_config

        return load_config
    if name == "measure":
        from ablate.measure import measure

        return measure
    if name == "from_checkpoint":
        from ablate.checkpoints import from_checkpoint

        return from_checkpoint
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")
