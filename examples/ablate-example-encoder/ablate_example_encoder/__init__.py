"""An example ablate plugin: the `example-patchconv` vision encoder."""

from ablate_example_encoder.patchconv import PatchConvConfig, PatchConvEncoder

__all__ = ["PatchConvConfig", "PatchConvEncoder"]
