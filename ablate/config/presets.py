"""Where named YAML files are found: presets, grids, claims files and training stages, in the preset folders.

The preset folders are $ABLATE_PRESETS (os.pathsep-separated, searched first), then the folders that plugins
register (`register_preset_folders`; the built-in one is experiments/, installed as `ablate_experiments`). In each,
a kind of file has its own subfolder:

    NAME.yaml           a preset: `ablate run NAME`
    grids/NAME.yaml     a grid: `ablate grid NAME`
    claims/NAME.yaml    a claims file: `ablate compare NAME`
    stages/NAME.yaml    a training stage: `train.stages: [NAME, ...]`

The first folder that has a name wins, so a user's folder can replace a shipped file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ablate.api.registry import Registry, get_registry

PRESET_DIRS_ENV = "ABLATE_PRESETS"
# kind of named file -> its subfolder of a preset folder
SUBFOLDERS = {"preset": "", "grid": "grids", "claims": "claims", "stage": "stages"}


def preset_dirs(registry: Registry | None = None) -> list[Path]:
    """$ABLATE_PRESETS first, then the folders plugins register."""
    dirs = [Path(p) for p in os.environ.get(PRESET_DIRS_ENV, "").split(os.pathsep) if p]
    return dirs + [folder for _, folder in (registry or get_registry()).preset_folders]


def named_files(kind: str = "preset", registry: Registry | None = None) -> dict[str, Path]:
    """Name -> file of one kind (preset, grid, claims, stage) over the preset folders; the first folder wins."""
    files: dict[str, Path] = {}
    for folder in preset_dirs(registry):
        for path in sorted((folder / SUBFOLDERS[kind]).glob("*.yaml")):
            files.setdefault(path.stem, path)
    return dict(sorted(files.items()))


def preset_files(registry: Registry | None = None) -> dict[str, Path]:
    return named_files("preset", registry)
