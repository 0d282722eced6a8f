"""Loading the weights a VLM's config names, strictly: each component's own file, then a whole-VLM checkpoint
directory through its registered format (which maps its key names onto the VLM's)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ablate.api.errors import CheckpointError
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry
from ablate.api.weights import load_state_dict_strict, read_tensors
from ablate.config.checkpoint_folders import detect_format

if TYPE_CHECKING:  # pragma: no cover
    from ablate.model.vlm import VLM


def load_weights(vlm: VLM, registry: Registry | None = None) -> list[str]:
    """Load every weights path the VLM's config names: each component's, then a whole-VLM checkpoint.

    Returns what was loaded ('kind: path'), for the record.
    """
    registry = registry or get_registry()
    loaded = []
    for kind in KINDS:
        component = getattr(vlm, kind)
        path = component.config.weights
        if path:
            with registry.blame(kind, component.name, f"loading weights from {path}"):
                component.load_weights(path)
            loaded.append(f"{kind}: {path}")
    if vlm.config.weights:
        directory = Path(vlm.config.weights)
        fmt = detect_format(directory, registry)
        tensors = read_tensors(directory)
        with registry.blame("checkpoint_format", fmt.name, f"mapping the keys of {directory}"):
            tensors, hint = fmt.to_vlm_keys(tensors, vlm)
        try:
            load_state_dict_strict(vlm, tensors, f"{fmt.name} checkpoint {directory} (keys as mapped onto the VLM)")
        except CheckpointError as exc:
            if not hint:
                raise
            raise CheckpointError(f"{exc} {hint}") from None
        loaded.append(f"vlm: {directory} ({fmt.name})")
    return loaded
