"""pluggy hook specifications: one per component kind.

A plugin is a module (or object) named by an entry point in the `ablate` group. It implements any of these
hooks with `@ablate.hookimpl` and calls `register(ComponentClass)` once per component:

    import ablate

    @ablate.hookimpl
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


# kind -> hook name; the one place that ties a component kind to its hook.
HOOKS = {
    "encoder": "register_encoders",
    "reducer": "register_reducers",
    "connector": "register_connectors",
    "decoder": "register_decoders",
}
