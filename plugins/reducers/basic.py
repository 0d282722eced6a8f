"""Token reducers that need nothing but the tokens themselves."""

from __future__ import annotations

from ablate.components import EncoderOutput, TokenReducer
from ablate.hookspecs import hookimpl


class NoReducer(TokenReducer):
    """Keep every token (the baseline)."""

    name = "none"

    def forward(self, features: EncoderOutput) -> EncoderOutput:
        return features


@hookimpl
def register_reducers(register):
    register(NoReducer)
