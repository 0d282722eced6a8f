"""ablate's own model directories (what `ablate train` writes, see ablate.runs) as a checkpoint format.

config.json holds the model's ablate config and the keys of tied tensors stored once; model.safetensors holds the
VLM's state dict under its own keys, so the key map is the identity (plus the tied keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ablate import runs
from ablate.components import CheckpointFormat
from ablate.hookspecs import hookimpl


class AblateRun(CheckpointFormat):
    """ablate's own model directory: a training run's final model or one of its checkpoints."""

    name = "ablate-run"

    def detect(self, directory: Path, hf_config: dict[str, Any]) -> bool:
        return hf_config.get("model_type") == runs.MODEL_TYPE

    def config(self, directory: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
        return runs.model_config(directory, hf_config)

    def to_vlm_keys(self, tensors: dict[str, torch.Tensor], vlm) -> tuple[dict[str, torch.Tensor], str]:
        return runs.add_tied(tensors, runs.read_model_meta(vlm.config.weights)), ""


@hookimpl
def register_checkpoint_formats(register):
    register(AblateRun)
