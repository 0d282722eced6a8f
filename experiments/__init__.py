"""ablate's presets: one YAML file per system (and grids), installed as package data of `ablate_experiments`.

This module is a plugin (entry point `presets`) that registers its own folder, so `ablate run fastvlm-0.5b` finds
the preset from any directory, from a wheel as from a checkout. A plugin package can ship presets the same way.
"""

from __future__ import annotations

from pathlib import Path

from ablate.api import hookimpl


@hookimpl
def register_preset_folders(register):
    register(Path(__file__).resolve().parent)
