"""`ablate export` (run.export): the stages a runtime prepared, as files to carry to a machine this one is not, with
a manifest saying what each file is and how the stages chain, and the run's own input and first-token logits to
check a device's results against.

    FOLDER/manifest.json   the config, the runtime, and per stage: where it ran, its file(s), its inputs and
                           outputs (name, shape, dtype), its deviation from eager; a stage left to torch says why
    FOLDER/example.npz     pixel_values and input_ids as the first stage got them, and the logits they gave
    FOLDER/STAGE.onnx ...  each prepared stage's files, as the runtime loaded them (side files included)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ablate.api.runtimes import TORCH_RUNTIME
from ablate.measurement.record import Record
from ablate.version import __version__

MANIFEST = "manifest.json"
EXAMPLE = "example.npz"
HOW = (
    "Run the stages in order. Each stage's inputs are named by what they carry (pixel_values, tokens, input_ids, "
    "...): feed it the outputs of the stages before it (an output named NAME_out is the new NAME) and, for what no "
    "stage computes, example.npz's arrays (or your own of the same shape: the graphs have fixed shapes). A stage "
    "that ran in torch has no file: the record's fallback says why. example.npz's logits are what this run gave."
)


def write_export(folder: str, record: Record, prepared) -> str:
    """Write the export folder for a prepared run (ablate.measurement.modes.Prepared); returns a sentence for the
    notes."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    execution = record.execution
    stages, written = [], 0
    for name, _ in prepared.stages:
        entry = {"name": name, "runtime": execution.runtimes[name], **prepared.signatures.get(name, {})}
        source = prepared.files.get(name)
        if source is not None:
            side = sorted(path for path in Path(source).parent.iterdir() if path.name.startswith(Path(source).name))
            for path in side:
                shutil.copy2(path, target / path.name)
            entry["file"], entry["files"] = Path(source).name, [path.name for path in side]
            written += 1
        elif entry["runtime"] == TORCH_RUNTIME:
            entry["why"] = next((f for f in execution.fallbacks if f.startswith(f"the {name} stage")), None)
        entry["deviation_from_eager"] = (execution.deviation_from_eager or {}).get(name)
        stages.append(entry)
    with torch.inference_mode():
        logits = prepared.ttft(prepared.ctx)
    np.savez(
        target / EXAMPLE,
        pixel_values=prepared.ctx.pixel_values.float().cpu().numpy(),
        input_ids=prepared.ctx.input_ids.cpu().numpy(),
        logits=logits.float().cpu().numpy(),
    )
    manifest = {
        "ablate": __version__,
        "name": record.name,
        "runtime": execution.used.runtime,
        "stages": stages,
        "example": EXAMPLE,
        "how": HOW,
        "config": record.config,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return f"exported {written} of {len(stages)} stages to {target} ({MANIFEST} says what each file is)."
