"""ablate: swap, time and count the parts of a vision-language model from one config.

    import ablate
    record = ablate.measure("fastvlm-0.5b", ["encoder.image_size=512"], repeats=3)   # an ablate.Record
    planned = ablate.plan("fastvlm-7b")          # params, tokens, FLOPs on the meta device, in a fraction of a second
    vlm = ablate.build("fastvlm-0.5b")                                               # an nn.Module
    rows = ablate.results("results/r.db", where=["encoder=clip*"], as_frame=True)   # a results store's rows

Plugins import `ablate.api` (see CONTRIBUTING.md), nothing else.
"""

from __future__ import annotations

import logging

from ablate.version import __version__


def _drop_torchao_enum_notice(record: logging.LogRecord) -> bool:
    # torchao 0.18 under torch 2.14 warns on import that registering its enums is deprecated; transformers imports
    # it whenever it is installed, so without this every run with torchao installed would open with two such lines.
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_drop_torchao_enum_notice)

__all__ = ["VLM", "Record", "__version__", "build", "from_checkpoint", "load_config", "measure", "plan", "results"]

# The entry points above, imported on first use: `import ablate` and the CLI's startup stay light, and torch loads
# only when a model is needed. Module names differ from these names, so nothing shadows them.
_LAZY = {
    "VLM": "ablate.model.vlm",
    "build": "ablate.model.build",
    "from_checkpoint": "ablate.model.build",
    "load_config": "ablate.config.compose",
    "measure": "ablate.measurement.measure",
    "plan": "ablate.measurement.measure",
    "Record": "ablate.measurement.record",
    "results": "ablate.report.results",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ablate' has no attribute {name!r}")
