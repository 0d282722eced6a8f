"""ablate's own model folders: what `ablate train` writes as its final model and in every checkpoint, and what the
built-in `ablate-run` checkpoint format reads back (`ablate run FOLDER`, `ablate eval FOLDER`).

    FOLDER/
      model.safetensors   every tensor of the VLM under its state-dict keys; a tied tensor stored once
      config.json         {model_type: "ablate", format_version: 1, ablate_config: {...}, tied: {alias: stored key}}

`ablate_config` is the model's resolved config without its `run:` section and weights paths (the weights are
here), with the tokenizer path relative to the folder. Files are written to a temporary name and renamed, so a kill
never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ablate.api.errors import CheckpointError
from ablate.api.hooks import KINDS

MODEL_TYPE = "ablate"  # config.json's model_type for ablate's own model folders
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary path)`, then rename it to `path`: readers see the old file or the whole new one."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    temporary.replace(path)


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share storage (tied embeddings) stored once: (tensors, {alias: stored key})."""
    tensors, tied, seen = {}, {}, {}
    for key, value in state.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().contiguous().cpu()
    return tensors, tied


def save_model(directory: Path, vlm: torch.nn.Module, config: dict[str, Any], tokenizer_dir: str | None) -> None:
    """A model folder: MODEL_FILE (the VLM's state dict) and CONFIG_FILE (its ablate config and tied keys)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors, tied = unique_tensors(vlm.state_dict())
    write_atomically(directory / MODEL_FILE, lambda path: save_file(tensors, str(path)))
    config = {key: value for key, value in config.items() if key not in ("weights", "run")}
    for kind in KINDS:
        config[kind] = {**config[kind], "weights": None}  # the weights are in this folder now
    if tokenizer_dir is not None:
        config["train"] = {**config["train"], "tokenizer": os.path.relpath(tokenizer_dir, directory)}
    meta = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "ablate_config": config, "tied": tied}
    write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(meta, indent=1)))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A model folder's config.json."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def saved_config(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The ablate config stored in a model folder (its config.json parsed to `meta`), tokenizer path made absolute."""
    config = meta.get("ablate_config")
    if not isinstance(config, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} is an ablate model folder of format version {meta.get('format_version')}, "
            f"but this ablate reads version {FORMAT_VERSION}: retrain, or use the ablate version that wrote it."
        )
    train = dict(config.get("train") or {})
    if train.get("tokenizer"):
        train["tokenizer"] = str((directory / train["tokenizer"]).resolve())
    return {**config, "train": train}
