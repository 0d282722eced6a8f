"""The training run directory: what `ablate train` writes, and what resuming and evaluation read back.

    RUN_DIR/
      run.json              the resolved config and data folder the run was started with (a resume must match)
      metrics.jsonl         one line per logged step: stage, step, loss, learning rates, throughput
      tokenizer/            the tokenizer the run used
      checkpoints/step-NNNNNN/
        model.safetensors   every tensor of the VLM (state-dict keys), shared tensors stored once
        optimizer.safetensors + state.json   optimizer state, RNG states, stage and step: resume from here
        config.json         this checkpoint as a model directory (below)
      model.safetensors, config.json    the final model

The final model and each checkpoint are ablate model folders (`ablate.api.saved_models`): `ablate run RUN_DIR` times
the trained model, `ablate eval RUN_DIR` scores it, `ablate.from_checkpoint(RUN_DIR)` loads it. Files are written
to a temporary name and renamed, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ablate.api.errors import ConfigError
from ablate.api.saved_models import MODEL_FILE, save_model, write_atomically
from ablate.api.weights import load_state_dict_strict

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """Where a run stopped: the stage it was in, that stage's step, the global step, and the files."""

    directory: Path
    stage: int
    stage_step: int
    step: int
    state: dict[str, Any]


def save_checkpoint(
    run_dir: Path,
    vlm,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    position: dict[str, int],
    keep: int,
) -> Path:
    """A resumable checkpoint of the model, optimizer state and RNG states; older ones beyond `keep` removed."""
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step-{position['step']:06d}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(partial, vlm, config, str(run_dir / TOKENIZER_DIR))
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.random.get_rng_state()
    save_file(tensors, str(partial / "optimizer.safetensors"))
    (partial / "state.json").write_text(json.dumps({**position, "param_groups": groups}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)  # the rename makes the checkpoint exist, complete, at once
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old.directory, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    found = []
    for directory in sorted((run_dir / CHECKPOINTS).glob("step-[0-9]*")):
        state_file = directory / "state.json"
        if directory.name.endswith(".partial") or not state_file.is_file():
            continue
        state = json.loads(state_file.read_text())
        found.append(Checkpoint(directory, state["stage"], state["stage_step"], state["step"], state))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def trained_step(directory: Path) -> int | None:
    """The global step of the model in `directory`: a checkpoint's own, a finished run's last; None for a folder
    `ablate train` did not write."""
    if (directory / "state.json").is_file():
        return json.loads((directory / "state.json").read_text())["step"]
    checkpoints = list_checkpoints(directory) if (directory / RUN_FILE).is_file() else []
    return checkpoints[-1].step if checkpoints else None  # the final model is saved with the last step's checkpoint


def load_checkpoint(checkpoint: Checkpoint, vlm, optimizer: torch.optim.Optimizer) -> None:
    """Model weights, optimizer state and the RNG state of a checkpoint, into a freshly built model and optimizer."""
    from safetensors.torch import load_file

    model = load_file(str(checkpoint.directory / MODEL_FILE))  # tied tensors stored once: the strict load ties them
    load_state_dict_strict(vlm, model, f"checkpoint {checkpoint.directory}")
    tensors = load_file(str(checkpoint.directory / "optimizer.safetensors"))
    torch.random.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": checkpoint.state["param_groups"]})


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors ('state.INDEX.NAME') and its param groups as JSON-ready dicts."""
    state_dict = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
        for index, entries in state_dict["state"].items()
        for name, value in entries.items()
    }
    return tensors, state_dict["param_groups"]


# ----------------------------------------------------------------------------------------------- run.json


def start_or_resume(run_dir: Path, identity: dict[str, Any]) -> Checkpoint | None:
    """Claim `run_dir` for this run; the newest checkpoint to resume from if it already holds the same run.

    A folder holding another run (a different config or data) is refused: resuming it would mix two runs.
    """
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != identity:
            changed = sorted(_differences(previous, identity, "")) or ["format"]
            raise ConfigError(
                f"{run_dir} holds a training run of another config or data set (differences: "
                f"{', '.join(changed[:5])}). Give a new --out folder, or delete that folder to start over; "
                f"an interrupted run resumes only with the same config, overrides and data."
            )
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} is a folder that holds other files: give a new or empty folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=1))
    return None


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            found
            for key in set(old) | set(new)
            if old.get(key) != new.get(key)
            for found in _differences(old.get(key), new.get(key), f"{path}.{key}".lstrip("."))
        ]
    return [path]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after `step` (the checkpoint a resumed run starts from): they will be logged again."""
    rows = [row for row in read_metrics(run_dir) if row["step"] <= step]
    path = run_dir / METRICS_FILE
    write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))
