"""ablate's own model folders (what `ablate train` writes, `ablate.api.saved_models`) as a checkpoint format.

config.json holds the model's ablate config; model.safetensors holds the VLM's state dict under its own keys, so the
key map is the identity (a tied tensor stored once is tied again by the strict load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ablate.api import SAVED_MODEL_TYPE, CheckpointFormat, hookimpl, saved_config


class AblateRun(CheckpointFormat):
    """ablate's own model folder: a training run's final model or one of its checkpoints."""

    name = "ablate-run"

    def detect(self, directory: Path, hf_config: dict[str, Any]) -> bool:
        return hf_config.get("model_type") == SAVED_MODEL_TYPE

    def config(self, directory: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
        return saved_config(directory, hf_config)

    def to_vlm_keys(self, tensors: dict[str, torch.Tensor], vlm) -> tuple[dict[str, torch.Tensor], str]:
        return tensors, ""


@hookimpl
def register_checkpoint_formats(register):
    register(AblateRun)
