"""pluggy hook specifications: one per component kind, plus checkpoint formats and preset folders.

A plugin is a module (or object) named by an entry point in the `ablate` group. It implements any of these
hooks with `@hookimpl` and calls `register(...)` once per thing it adds:

    from ablate.api import hookimpl

    @hookimpl
    def register_encoders(register):
        register(MyEncoder)
"""

from __future__ import annotations

import pluggy

PROJECT = "ablate"
ENTRY_POINT_GROUP = "ablate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_encoders(register):
    """Register VisionEncoder subclasses: call register(cls) for each."""


@hookspec
def register_reducers(register):
    """Register TokenReducer subclasses: call register(cls) for each."""


@hookspec
def register_connectors(register):
    """Register Connector subclasses: call register(cls) for each."""


@hookspec
def register_decoders(register):
    """Register Decoder subclasses: call register(cls) for each."""


@hookspec
def register_checkpoint_formats(register):
    """Register CheckpointFormat subclasses (whole-VLM checkpoint layouts): call register(cls) for each."""


@hookspec
def register_runtimes(register):
    """Register Runtime subclasses (where the timed stages run, `run.runtime`): call register(cls) for each."""


@hookspec
def register_preset_folders(register):
    """Register folders of preset YAML files (`ablate run NAME` finds NAME.yaml there): call register(path)."""


# The model's four component kinds, in pipeline order; each is also the config key of its component.
KINDS = ("encoder", "reducer", "connector", "decoder")

# kind -> hook name; the one place that ties a kind of registered thing to its hook. The first four are the
# model's components; the others are looked up by the core when it needs them.
HOOKS = {
    **dict(zip(KINDS, ("register_encoders", "register_reducers", "register_connectors", "register_decoders"))),
    "checkpoint_format": "register_checkpoint_formats",
    "runtime": "register_runtimes",
    "preset_folder": "register_preset_folders",
}
