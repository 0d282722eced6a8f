"""Token reducers that need nothing but the tokens themselves."""

from __future__ import annotations

from ablate.components import StageContext, TokenReducer
from ablate.hookspecs import hookimpl


class NoReducer(TokenReducer):
    """Keep every token (the baseline)."""

    name = "none"

    def forward(self, ctx: StageContext) -> StageContext:
        return ctx


@hookimpl
def register_reducers(register):
    register(NoReducer)
